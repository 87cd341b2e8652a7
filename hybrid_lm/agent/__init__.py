"""The web-agent loop: MiniWoB++ in headless Chromium (env), scripted experts (experts), episodes
played by any policy and encoded as tokens (episodes), and the `hybrid-lm agent` commands:
demos, sft (behaviour cloning) and eval (success per task through vLLM)."""
