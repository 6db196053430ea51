"""A small PromQL reader for tests: the series selectors of an expression, with the label names each one is
matched, grouped or legended by. Enough for Grafana dashboards (selectors, functions, aggregations with by/without,
ranges, arithmetic); it refuses what it does not understand rather than guessing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[0-9a-zA-Z$_:]+\])
  | (?P<number>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}])
""", re.X)
FUNCTIONS = {"rate", "irate", "increase", "delta", "deriv", "abs", "ceil", "floor", "round", "clamp_min",
             "clamp_max", "histogram_quantile", "label_values", "avg_over_time", "max_over_time", "min_over_time",
             "sum_over_time", "last_over_time", "time", "vector", "scalar"}
AGGREGATIONS = {"sum", "avg", "max", "min", "count", "topk", "bottomk", "quantile", "stddev", "group"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}


@dataclass
class Selector:
    name: str | None
    """The metric name written before the braces, if any."""
    matchers: dict[str, tuple[str, str]] = field(default_factory=dict)
    """label -> (operator, value), ``__name__`` included."""
    grouped_by: set[str] = field(default_factory=set)
    """Labels of the by/without clauses of the aggregations around this selector."""

    def names(self, known: set[str]) -> set[str]:
        """The series names of ``known`` this selector can match."""
        if self.name is not None:
            return {self.name} & known
        op, value = self.matchers.get("__name__", ("", ""))
        if op == "=~":
            return {n for n in known if re.fullmatch(value, n)}
        if op == "=":
            return {value} & known
        raise ValueError(f"selector without a metric name: {self.matchers}")

    def labels(self) -> set[str]:
        return (set(self.matchers) - {"__name__"}) | self.grouped_by


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"PromQL {expr!r}: cannot read at {expr[pos:pos + 20]!r}")
        pos = m.end()
        if m.lastgroup != "space":
            out.append((m.lastgroup or "", m.group()))
    return out


def selectors(expr: str) -> list[Selector]:
    """Every series selector of ``expr``; each knows the labels the aggregations enclosing it group by."""
    toks = tokens(expr)
    found: list[Selector] = []
    stack: list[set[str]] = []  # one entry per open parenthesis: labels grouped by at that level
    pending: set[str] = set()  # a by (...) seen, waiting for its aggregation's opening parenthesis
    i = 0

    def label_list(j: int) -> tuple[set[str], int]:
        if toks[j][1] != "(":
            raise ValueError(f"PromQL {expr!r}: expected ( after by/without")
        labels, j = set(), j + 1
        while toks[j][1] != ")":
            if toks[j][0] == "ident":
                labels.add(toks[j][1])
            elif toks[j][1] != ",":
                raise ValueError(f"PromQL {expr!r}: {toks[j][1]!r} in a label list")
            j += 1
        return labels, j + 1

    def matchers(j: int, sel: Selector) -> int:
        j += 1  # past {
        while toks[j][1] != "}":
            (kind, label), (_, op), (vkind, value) = toks[j], toks[j + 1], toks[j + 2]
            if kind != "ident" or op not in ("=", "!=", "=~", "!~") or vkind != "string":
                raise ValueError(f"PromQL {expr!r}: bad matcher at {label!r}")
            sel.matchers[label] = (op, value[1:-1].encode().decode("unicode_escape"))
            j += 3
            if toks[j][1] == ",":
                j += 1
        return j + 1

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in ("by", "without"):
            if i and toks[i - 1][1] == ")":
                raise ValueError(f"PromQL {expr!r}: write 'sum by (...) (...)', not a by clause after the "
                                 "parentheses (this reader does not follow that form)")
            labels, i = label_list(i + 1)
            pending |= labels
            continue
        if kind == "ident" and (text in AGGREGATIONS or text in FUNCTIONS) and nxt in ("(", "by", "without"):
            i += 1
            continue
        if kind == "ident" and text in KEYWORDS:
            raise ValueError(f"PromQL {expr!r}: {text!r} is not supported by this reader")
        if text == "(":
            stack.append(pending)
            pending = set()
            i += 1
            continue
        if text == ")":
            stack.pop()
            i += 1
            continue
        if kind == "ident" or text == "{":
            sel = Selector(name=text if kind == "ident" else None)
            i = i + 1 if kind == "ident" else i
            if i < len(toks) and toks[i][1] == "{":
                i = matchers(i, sel)
            sel.grouped_by = set().union(*stack) if stack else set()
            found.append(sel)
            continue
        i += 1  # numbers, ranges, strings (label_values' arguments are handled by the caller), operators
    return found


def legend_labels(legend: str) -> set[str]:
    """Labels a Grafana legendFormat names (``{{label}}``)."""
    return set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend))
