"""The demo configs, shipped in the wheel as package data (ray_jobs/configs/*.yaml)."""
