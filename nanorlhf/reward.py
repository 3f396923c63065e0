"""What the reward model reads, in one place: the prompt template, the response *text* and EOS if it ended.

RM training (train_rm.py), PPO's rewards (train_ppo.py) and best-of-N (baselines/bestofn.py) all build the RM's
input with `rm_input` from decoded text, so the RM scores a policy's sample exactly as it saw such a response in
training: canonical BPE splits, no stray template tokens. Scoring a policy's raw sampled ids instead would let PPO
find non-canonical token sequences (or special ids) that the RM never saw — a path for reward hacking.
"""
import torch

from nanorlhf.common import pad


def rm_input(tok, prompt, response, finished, block_size):
    """prompt template + response + EOS if the response ended; the last block_size tokens (the end is scored)."""
    return tok.format_example(prompt, response, finished)[0][-block_size:]


def score(model, ids, mask):
    """The reward of each right-padded row, read at its last real token (the EOS if produced): (B,).
    Right padding: a real token never attends to a pad after it, so the pads' contents cannot change a score."""
    values = model(ids)  # (B, T) a scalar at every position
    last = mask.long().sum(1) - 1  # (B,) index of the last real token
    return values.gather(1, last[:, None]).squeeze(1)  # (B,)


def score_texts(model, tok, prompts, responses, finished, device):
    """RM scores (B,) of (prompt, response text, finished) triples, through `rm_input`, in one forward pass."""
    seqs = [rm_input(tok, p, y, f, model.config.block_size) for p, y, f in zip(prompts, responses, finished)]
    ids, mask = pad(seqs, tok.pad_id, device=device)  # (B, T) right-padded
    return score(model, ids, mask)


def score_groups(model, tok, groups, device):
    """Scores (B, K) of a batch of ranking records ({"prompt", "responses", "finished"}), K ragged, and the mask of
    the real ones (B, K): one forward pass over all B·K responses."""
    flat = score_texts(model, tok, [g["prompt"] for g in groups for _ in g["responses"]],
                       [y for g in groups for y in g["responses"]], [f for g in groups for f in g["finished"]],
                       device)  # (B·K,)
    K = max(len(g["responses"]) for g in groups)
    rewards = torch.zeros(len(groups), K, device=device)  # (B, K)
    valid = torch.zeros(len(groups), K, dtype=torch.bool, device=device)  # (B, K) 1 = a real response
    i = 0
    for b, g in enumerate(groups):
        k = len(g["responses"])
        rewards[b, :k], valid[b, :k] = flat[i:i + k], True
        i += k
    return rewards, valid


@torch.no_grad()
def score_records(model, tok, records, device, batch_size=64):
    """Scores of every response of every record, as lists (eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(records), batch_size):
        rewards, valid = score_groups(model, tok, records[i:i + batch_size], device)
        out += [r[v].tolist() for r, v in zip(rewards, valid)]
    model.train(was_training)
    return out
