"""The seeds' server (seeds/002, main.py), kept as it was where it matters for speed.

One FastAPI endpoint, `GET /answer?prompt=…`, calls `model.generate` once per request for that
one prompt; requests run one at a time. The seeds' `async def` endpoint blocks the event loop
during `generate`, which serialises them; here a lock does the same in a worker thread, so
`/health` still answers while a request runs.

Changed so that it does the same work as `python -m conch serve` (bench/serve_throughput.py
compares the two):
- the prompt goes through the model's chat template, and only the new tokens are decoded;
- `max_new_tokens` comes from the request, decoding is greedy (`do_sample=False`), one beam:
  the seeds' settings (num_beams=4, repetition_penalty, no_repeat_ngram_size, max_length=100)
  would make every request several times more expensive; `--seeds-generate-kwargs` restores them;
- bf16 on GPU (the seeds used fp16), fp32 on CPU, like conch.

  python bench/seeds_server.py --model outputs/bench/deepseek-r1-1.5b-arch --port 8001
"""

import argparse
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="a model folder (config.json, weights, tokenizer)")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8001)
parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
parser.add_argument("--seeds-generate-kwargs", action="store_true",
                    help="use the seeds' exact generate() settings (beam search 4, sampling, penalties)")
args = parser.parse_args()

if args.threads:
    torch.set_num_threads(args.threads)
device = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(
    args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
model.eval()
eos = model.generation_config.eos_token_id
eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
lock = threading.Lock()
app = FastAPI()

SEEDS_KWARGS = dict(min_length=30, top_p=0.85, temperature=0.6, do_sample=True, repetition_penalty=1.2,
                    no_repeat_ngram_size=3, num_beams=4, early_stopping=True)


@app.get("/answer")
def answer(prompt: str, max_new_tokens: int = 100):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    kwargs = SEEDS_KWARGS if args.seeds_generate_kwargs else dict(do_sample=False, num_beams=1)
    try:
        with lock:
            started = time.perf_counter()
            with torch.inference_mode():
                outputs = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                         **kwargs)
            seconds = time.perf_counter() - started
    except Exception as e:  # the seeds' handler: log and answer 500
        raise HTTPException(status_code=500, detail=str(e))
    new = outputs[0, inputs["input_ids"].shape[1]:].tolist()
    if new and new[-1] in eos_ids:  # the end token is not output (conch does not count it either)
        new = new[:-1]
    return {"generated_text": tokenizer.decode(new, skip_special_tokens=True), "completion_tokens": len(new),
            "prompt_tokens": inputs["input_ids"].shape[1], "generate_s": round(seconds, 4)}


@app.get("/health")
def health():
    return {"status": "healthy", "model": args.model}


if __name__ == "__main__":
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
