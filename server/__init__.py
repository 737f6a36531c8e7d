"""polyarch's inference server (`polyarch serve`): a bundle behind the KServe v2 protocol, the
OpenAI completions API and Prometheus metrics (server/app.py). Above the runtime: it imports
nothing of the compiler, and runs with the runtime-only install."""
