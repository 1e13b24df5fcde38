"""Tests of the HTTP gateway: OpenAI SDK, /metrics, the console in Chromium."""
