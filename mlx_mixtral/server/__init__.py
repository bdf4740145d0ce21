"""The HTTP server: OpenAI's and Ollama's APIs over one model, a queue in front of its one MLX
thread, and the KV caches kept between requests."""
