"""HybridCache as a transformers Cache: beam search and beam sampling against a reference that
scores every beam with a full forward, row reorder/select/repeat on every state type, crop and
assisted decoding on the Transformer, the stateful archs refusing both, and generate continuing
from a cache it returned."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import Cache

from hybrid_lm.archs.cache import HybridCache

from test_models import ATOL, CASES, PAD, assert_tokens_match, greedy, left_pad, make_model, rand_ids

ALL = [*CASES, "lrt"]
STATEFUL = ("samba", "sambay", "sambay-da", "lrt")


def continuation_logits(model, seqs: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits [B, T - P + 1, V] at positions P-1 .. T-1 (the prompt's last token, then each later
    one), recomputed from scratch. For LRT as generate defines them: the prompt through the
    interleaved schedule (its prefill), every later token by the exact recurrence from there."""
    with torch.no_grad():
        if model.config.model_type != "hybrid_lrt":
            return model(seqs).logits[:, prompt_len - 1:]
        cache = model.new_cache(seqs.shape[0])
        first = model(seqs[:, :prompt_len], past_key_values=cache).logits[:, -1:]
        if seqs.shape[1] == prompt_len:
            return first
        rest = model(seqs[:, prompt_len:], past_key_values=cache, exact_recurrence=True).logits
        return torch.cat([first, rest], dim=1)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1).double()  # as generate: fp32 log-softmax


def sequence_logprob(model, seq: torch.Tensor, prompt_len: int) -> float:
    """Sum of the log-probabilities of seq's tokens after the prompt, recomputed from scratch."""
    lp = log_probs(continuation_logits(model, seq[None], prompt_len)[0, :-1])
    return float(lp.gather(-1, seq[prompt_len:, None]).sum())


def beam_search_reference(model, prompt: torch.Tensor, beams: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search with no end token, by brute force: at each step every live beam's every next
    token is scored with a full forward over its whole sequence, and the best `beams` of all
    (beam, token) pairs survive. Returns the beams [beams, P + steps] best first and their
    scores (summed log-probabilities over the generated length, transformers' length penalty 1)."""
    seqs, scores = prompt[None], torch.zeros(1, dtype=torch.float64)
    for _ in range(steps):
        cand = (scores[:, None] + log_probs(continuation_logits(model, seqs, len(prompt))[:, -1])).flatten()
        top = cand.topk(beams)
        V = cand.numel() // seqs.shape[0]
        seqs = torch.cat([seqs[top.indices // V], (top.indices % V)[:, None]], dim=1)
        scores = top.values
    return seqs, scores / steps


@pytest.mark.parametrize("case", ALL)
def test_beam_search_equals_brute_force(case):
    """Two left-padded prompts, 3 beams, 5 new tokens: every returned beam, in order, and its
    score equal the brute-force search run on each prompt alone."""
    model = make_model(case)
    beams, steps = 3, 5
    prompts = [rand_ids(9), rand_ids(6)]
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, num_beams=beams, num_return_sequences=beams, do_sample=False,
                             max_new_tokens=steps, eos_token_id=None, pad_token_id=PAD, length_penalty=1.0,
                             return_dict_in_generate=True, output_scores=True)
    assert isinstance(out.past_key_values, Cache)
    for b, prompt in enumerate(prompts):
        want, want_scores = beam_search_reference(model, prompt, beams, steps)
        got = out.sequences[b * beams:(b + 1) * beams, ids.shape[1]:]
        assert torch.equal(got, want[:, len(prompt):]), f"prompt {b}: beams {got.tolist()}, expected {want.tolist()}"
        torch.testing.assert_close(out.sequences_scores[b * beams:(b + 1) * beams].double(), want_scores,
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ALL)
def test_beam_sampling_scores_are_the_sequences_log_probabilities(case):
    """Beam sampling (2 beams, 2 prompts): each returned sequence's score is the summed
    log-probability of its tokens under a full forward of that sequence, so every cached step
    continued the row it claims (a wrong reorder would score another beam's history)."""
    model = make_model(case)
    beams, steps, P = 2, 6, 7
    ids = rand_ids(2, P)
    with torch.no_grad():
        out = model.generate(ids, num_beams=beams, num_return_sequences=beams, do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=steps, eos_token_id=None, pad_token_id=PAD,
                             return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (2 * beams, P + steps)
    for seq, score in zip(out.sequences, out.sequences_scores):
        assert abs(sequence_logprob(model, seq, P) / steps - float(score)) < 1e-4


def decode_logits(model, cache: HybridCache, tokens: torch.Tensor, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("op", ["reorder", "select", "select_mask", "repeat"])
def test_row_operations_move_every_state(case, op):
    """Prefill three left-padded prompts, permute/select/repeat the cache's rows, decode two
    tokens: the logits equal a fresh cache prefilled with the rows in their new order. This
    moves K,V (full and sliding), Mamba conv and SSM states, SambaY's shared K,V, LRT's latent
    and the validity mask together."""
    model = make_model(case)
    prompts = [rand_ids(n) for n in (11, 6, 9)]
    rows = {"reorder": [2, 0, 0], "select": [2, 0], "select_mask": [0, 2], "repeat": [0, 0, 1, 1, 2, 2]}[op]
    ids, mask = left_pad(prompts)
    cache = model.new_cache(3)
    decode_logits(model, cache, ids, mask)
    if op == "reorder":
        cache.reorder_cache(torch.tensor(rows))
    elif op == "select":
        cache.batch_select_indices(torch.tensor(rows))
    elif op == "select_mask":
        cache.batch_select_indices(torch.tensor([True, False, True]))
    else:
        cache.batch_repeat_interleave(2)
    assert cache.batch_size == len(rows)
    want_cache = model.new_cache(len(rows))
    decode_logits(model, want_cache, ids[rows], mask[rows])
    nxt = rand_ids(len(rows), 2)
    for t in range(2):
        step_mask = torch.cat([mask[rows], torch.ones(len(rows), t + 1, dtype=mask.dtype)], 1)
        got = decode_logits(model, cache, nxt[:, t:t + 1], step_mask)
        want = decode_logits(model, want_cache, nxt[:, t:t + 1], step_mask)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", ["transformer", "samba", "lrt"])
def test_static_cache_reorders_in_place(case):
    """A static cache's beam reorder rewrites its buffers where they are (a captured decode step
    keeps reading the right memory) and decodes like a dynamic cache reordered the same way."""
    model = make_model(case)
    ids = rand_ids(3, 8)
    static, dynamic = model.new_cache(3, max_len=16), model.new_cache(3)
    decode_logits(model, static, ids)
    decode_logits(model, dynamic, ids)
    tensors = [t for layer in static.layers if layer is not None for t in vars(layer).values()
               if isinstance(t, torch.Tensor)] + [static.valid, static.num_real]
    addresses = [t.data_ptr() for t in tensors]
    beam_idx = torch.tensor([1, 1, 0])
    static.reorder_cache(beam_idx)
    dynamic.reorder_cache(beam_idx)
    assert [t.data_ptr() for t in tensors] == addresses
    nxt = rand_ids(3, 1)
    torch.testing.assert_close(decode_logits(model, static, nxt), decode_logits(model, dynamic, nxt),
                               atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_crop_rolls_back_attention(window):
    """Transformer: prefill, feed a chunk of 5, crop 3 of them, continue: the logits equal a full
    forward over the tokens kept. A sliding-window layer past its window needs past recording
    (it would have dropped the slots the crop uncovers), and says so without it."""
    model = make_model("transformer", sliding_window=window)
    seq = rand_ids(2, 20)
    cache = model.new_cache(2)
    cache.activate_past_recording()
    decode_logits(model, cache, seq[:, :9])
    decode_logits(model, cache, seq[:, 9:14])
    cache.crop(-3)
    assert cache.get_seq_length() == 11 and cache.is_croppable
    if window is not None:
        assert all(layer.k.shape[1] == window - 1 for layer in cache.layers)
    kept = torch.cat([seq[:, :11], seq[:, 14:17]], dim=1)
    with torch.no_grad():
        got = model(kept[:, 11:], past_key_values=cache, use_cache=True).logits
        want = model(kept).logits[:, 11:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    if window is not None:
        plain = model.new_cache(2)
        decode_logits(model, plain, seq[:, :14])
        with pytest.raises(ValueError, match="activate_past_recording"):
            plain.crop(-3)


@pytest.mark.parametrize("window", [None, 6])
def test_assisted_decoding_equals_greedy(window):
    """Transformer with a smaller Transformer drafting for it (a different model, so drafts are
    both accepted and rejected): assisted greedy decoding gives exactly plain greedy's tokens,
    also with a sliding window the sequence runs past."""
    model = make_model("transformer", sliding_window=window)
    assistant = make_model("transformer", sliding_window=window, num_hidden_layers=2)
    big = dict(model.named_parameters())
    with torch.no_grad():  # the draft model: the big one's first layers, lightly disturbed
        for name, p in assistant.named_parameters():
            p.copy_(big[name] + 0.05 * torch.randn_like(p))
    ids = rand_ids(1, 8)
    want = greedy(model, ids, 20)
    with torch.no_grad():
        got = model.generate(ids, assistant_model=assistant, max_new_tokens=20, do_sample=False, pad_token_id=PAD,
                             eos_token_id=None)
    assert_tokens_match(got[0, 8:], want.sequences[0, 8:], [lg[0] for lg in want.logits], "assisted")


@pytest.mark.parametrize("case", STATEFUL)
def test_stateful_archs_refuse_assisted_decoding_and_crop(case):
    model = make_model(case)
    assert model._is_stateful
    ids = rand_ids(1, 6)
    with pytest.raises(ValueError, match="assisted generation is not supported with stateful models"):
        model.generate(ids, assistant_model=model, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    cache = model.new_cache(1)
    decode_logits(model, cache, ids)
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.crop(-1)


@pytest.mark.parametrize("case", ALL)
def test_generate_continues_from_its_cache(case):
    """greedy 5 tokens, then generate 6 more from the returned cache and sequences: the same
    tokens as one greedy call of 11 (left-padded batch)."""
    model = make_model(case)
    ids, mask = left_pad([rand_ids(8), rand_ids(5)])
    want = greedy(model, ids, 11, mask)
    first = greedy(model, ids, 5, mask)
    cache = first.past_key_values
    assert isinstance(cache, Cache) and cache.get_seq_length() == ids.shape[1] + 4
    mask2 = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)
    second = greedy(model, first.sequences, 6, mask2, past_key_values=cache)
    for b in range(2):
        assert_tokens_match(second.sequences[b, ids.shape[1]:], want.sequences[b, ids.shape[1]:],
                            [lg[b] for lg in want.logits], f"row {b}")
