"""The peer on bench.py's PPO workloads: TRL 0.24.0's PPOTrainer (the last TRL release that has it), run by
`python bench.py --peer` in a subprocess so its timings sit beside nanorlhf's, measured on the same machine.

Optional dependency: `pip install -r requirements-peer.txt` (trl 0.24.0 and the stack it was released against, pinned).

The workload is bench.py's, given by flags (defaults: W1): a GPT-2 (transformers GPT2LMHeadModel) policy of
--n_layer layers, --n_embd width, --n_head heads, --vocab tokens and --block_size positions, randomly initialized;
a frozen copy as reference; reward and value models of the same shape with a scalar head
(GPT2ForSequenceClassification, num_labels=1, what PPOTrainer reads: backbone + `score`). One PPO batch = --prompts
prompts of --prompt_len random tokens → --new_tokens sampled tokens each (temperature 1, top_k 0, top_p 1: the full
softmax; no stop token, so no early stop) → scoring (reference log-probs, RM score, values) → --ppo_epochs epochs
× --minibatches minibatches, one AdamW step of policy and value each (per_device_train_batch_size = prompts,
gradient_accumulation_steps 1, local_rollout_forward_batch_size = prompts). The pad id is one past the vocabulary,
so no sampled token is taken for padding. PPOTrainer's own defaults otherwise (k1 KL, vf_coef 0.1, cliprange 0.2);
num_sample_generations 0 (no sample tables between batches), no saving, no logging integrations.

Precision: fp32 (bf16=False) unless --bf16. PPOTrainer's config defaults to bf16 autocast, which on a CPU without
native bf16 matmuls takes ≈48 s per W1 batch: not a fair comparison there. On CUDA bench.py passes --bf16 (W2).
Time = wall seconds per batch (a TrainerCallback clocks each), median over the batches after one warm-up batch.

    python baselines/bench_peer.py --batches 3                 # W1 on CPU, 2 threads; the last line is JSON
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time


def peer_models(a):
    """(policy, ref_policy, reward_model, value_model) of the workload's shape, random init (seed 0), fp32."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=a.vocab, n_positions=a.block_size, n_embd=a.n_embd, n_layer=a.n_layer,
                        n_head=a.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1,
                        pad_token_id=a.vocab, bos_token_id=None, eos_token_id=None)
    policy = GPT2LMHeadModel(config)
    reward_model = GPT2ForSequenceClassification(config)
    return policy, copy.deepcopy(policy), reward_model, copy.deepcopy(reward_model)


def tokenizer(vocab):
    """Token i is the word "t{i}"; id `vocab`, one past what the models can sample, is the pad token and the EOS
    token (PPOTrainer reads both; with no stop token the EOS only counts the responses that contain it: none)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)} | {"<pad>": vocab}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<pad>")), pad_token="<pad>",
                                   eos_token="<pad>")


def run(a, models, out_dir):
    """Train a.batches + 1 PPO batches; returns the wall seconds of each batch (the first is the warm-up)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import PPOConfig, PPOTrainer

    class BatchClock(TrainerCallback):
        """Seconds of each PPO batch: from its start to on_step_end, which PPOTrainer calls once per batch (a
        batch's clean-up, gc.collect included, falls into the next one's time). a.lockstep: wait for a line on stdin
        before each batch and print the batch's seconds after it, so bench.py can interleave it with its own."""
        def __init__(self):
            self.seconds = []

        def start(self):
            if a.lockstep:
                sys.stdin.readline()  # "" at EOF: the parent is done; the run goes on to its end
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.start()

        def on_step_end(self, args, state, control, **kwargs):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.t0)
            if a.lockstep:
                print(f"peer batch seconds: {self.seconds[-1]}", flush=True)
            self.start()

    g = torch.Generator().manual_seed(1)
    n = a.prompts * (a.batches + 1)
    prompts = Dataset.from_dict({"input_ids": torch.randint(0, a.vocab, (n, a.prompt_len), generator=g).tolist()})
    cfg = PPOConfig(output_dir=out_dir, per_device_train_batch_size=a.prompts, gradient_accumulation_steps=1,
                    local_rollout_forward_batch_size=a.prompts, num_mini_batches=a.minibatches,
                    num_ppo_epochs=a.ppo_epochs, total_episodes=n, response_length=a.new_tokens, temperature=1.0,
                    stop_token=None, stop_token_id=None, missing_eos_penalty=None, num_sample_generations=0,
                    bf16=a.bf16, fp16=False, use_cpu=a.device == "cpu", report_to="none", save_strategy="no",
                    logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    policy, ref_policy, reward_model, value_model = models
    clock = BatchClock()
    trainer = PPOTrainer(args=cfg, processing_class=tokenizer(a.vocab), model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=prompts,
                         eval_dataset=prompts.select(range(a.prompts)), callbacks=[clock])
    trainer.train()
    return clock.seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("n_layer", 4), ("n_head", 4), ("n_embd", 128), ("vocab", 2048), ("block_size", 64),
                          ("prompts", 64), ("prompt_len", 32), ("new_tokens", 32), ("ppo_epochs", 4),
                          ("minibatches", 4), ("batches", 3), ("threads", 2)):
        p.add_argument(f"--{name}", type=int, default=default, help=f"default {default} (W1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--bf16", action="store_true", help="PPOTrainer's bf16 autocast (default: fp32)")
    p.add_argument("--lockstep", action="store_true", help="before each batch wait for a line on stdin; after it "
                   "print its seconds (bench.py --peer)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        import trl
    except ImportError:
        sys.exit("bench_peer.py needs the optional peer package: pip install -r requirements-peer.txt")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPOTrainer's "may move to trl.experimental" warning
    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as out_dir:
        seconds = run(a, peer_models(a), out_dir)[1:]  # batch 0 is the warm-up
    print(json.dumps({"peer": f"trl {trl.__version__} PPOTrainer", "bf16": a.bf16, "seconds": seconds,
                      "median": statistics.median(seconds)}))


if __name__ == "__main__":
    main()
