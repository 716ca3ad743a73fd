"""Stage 7's serving engine, in layers as in vLLM's server (`conch.serve` is the stage's public face).

- `protocol`: what goes over the wire (OpenAI-compatible requests, responses, errors);
- `service`: prepare, submit, complete, stream (HTTP-free); `responses`: the bodies it sends;
- `engine`: continuous batching in PyTorch, the one to read (`kv_batch`: its KV cache); `engine_vllm`: vLLM
  behind the same interface;
- `sampling`: sampling parameters, penalties, the detokenizer; `metrics`: Prometheus;
- `launch`: a server in a child process (notebooks, make run, tests, bench).
"""
