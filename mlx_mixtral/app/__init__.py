"""The Textual terminal chat app behind `mlx-mixtral chat` (issue #5: not built yet)."""
