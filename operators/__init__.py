"""The Kubernetes operator (Kopf) for scopeforge's Pipeline custom resource. Imports neither Ray nor torch."""
