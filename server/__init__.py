"""SpecTTS HTTP and WebSocket server: an OpenAI-compatible speech API over `engine.serving.service`."""
