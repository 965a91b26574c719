"""The LLM plumbing every stage calls through: the one HTTP client (retries, concurrency,
idempotency headers, dialects), the endpoint facts (context windows, languages, token
estimates) and the embedded llama.cpp server. Imports no stage."""
