"""The converter behind `mlx-mixtral convert` (issue #3: not built yet)."""
