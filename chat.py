"""Talk to any checkpoint with the instruction template used in training.

    python chat.py --ckpt runs/default/ppo_ptx/ckpt.pt --prompt "what color is the banana?"
    python chat.py --ckpt runs/default/sft/ckpt.pt          # interactive; an empty line or Ctrl-D quits

Your text is always encoded as plain text: typing "<|endoftext|>" cannot forge a template token.
"""
from dataclasses import dataclass

import torch

from nanorlhf import kernels
from nanorlhf.config import arg, parse_config
from nanorlhf.engine import generate
from nanorlhf.common import get_device, load_model


@dataclass
class ChatConfig:
    ckpt: str = arg("runs/default/ppo_ptx/ckpt.pt", "checkpoint file (any LM stage) or GPT-2 folder")
    prompt: str = arg("", "answer this one prompt and exit; empty = interactive")
    temperature: float = arg(1.0, "sampling temperature", positive=True)
    top_k: int = arg(0, "sample from the k most likely tokens only; 0 = off", low=0)
    top_p: float = arg(1.0, "nucleus sampling threshold; 1.0 = off", positive=True, high=1)
    greedy: bool = arg(False, "always take the most likely token")
    max_new_tokens: int = arg(64, "response length limit", low=1)
    seed: int = arg(1337, "sampling seed")
    device: str = arg("cpu", "cpu | cuda")


def reply(model, tok, prompt, cfg, generator):
    ids = tok.format_prompt(prompt)
    room = model.config.block_size - len(ids)
    if room < 1:
        return f"(prompt too long: {len(ids)} tokens, the context holds {model.config.block_size})"
    gen = generate(model, [ids], min(cfg.max_new_tokens, room), tok.eos_id, tok.pad_id, cfg.temperature,
                   top_k=cfg.top_k or None, top_p=cfg.top_p if cfg.top_p < 1 else None, greedy=cfg.greedy,
                   generator=generator)
    row = gen.tokens[0, gen.prompt_len:].tolist()
    text = tok.decode_response(row)
    return text if tok.eos_id in row else text + " [no end of text: cut at the length limit]"


def main(argv=None):
    cfg = parse_config(ChatConfig, argv)
    device = get_device(cfg.device)
    kernels.enable(None, device)  # the compiled decode step on CUDA, as every script
    try:
        model, tok, _ = load_model(cfg.ckpt, "lm", device)
    except (FileNotFoundError, ValueError) as e:  # a bad checkpoint file already exits in load_model
        raise SystemExit(f"chat.py: {e}")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if cfg.prompt:
        print(reply(model, tok, cfg.prompt, cfg, generator))
        return
    print(f"chatting with {cfg.ckpt} (empty line or Ctrl-D to quit)")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        print(reply(model, tok, line, cfg, generator))

if __name__ == "__main__":
    main()
