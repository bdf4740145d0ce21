"""The HTTP server: OpenAI's and Ollama's APIs over one model, a queue in front of its one MLX
thread, and the KV caches kept between requests."""

# The defaults, here so that `mlx-mixtral --help` shows them without importing the server.
DEFAULT_MAX_BODY = 4 * 2**20  # bytes of a request: a long conversation fits, a flood does not
