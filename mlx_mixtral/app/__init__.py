"""The Textual chat app behind `mlx-mixtral chat`: the app and its screens and widgets, the
SQLite store of conversations, export, and `engine.py`, its narrow interface to the model."""
