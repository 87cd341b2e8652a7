"""Model-level tests: configs and presets, transformers registration and save/load, forward and
loss, cached generation against full recomputation, left padding, SambaY's last-token prefill
and its cache, and the phi4-mini-flash parameter count and tensor names.

Models are tiny and run on the PyTorch reference kernels on the CPU. Their weights are
re-drawn at a larger scale than the init (and norms/biases/lambdas made non-trivial), so every
sub-layer moves the logits and a bug in one of them shows.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

import hybrid_lm
from hybrid_lm.archs.cache import KVCache, MambaState
from hybrid_lm.archs.layers import GMU, Attention, DifferentialCore, Mamba

ARCHS = ("transformer", "samba", "sambay", "sambay-da", "lrt")
MODEL_ARCHS = ("transformer", "samba", "sambay", "sambay-da")
# a tiny SambaY-DA in the released checkpoint's style: LayerNorm with bias, Wqkv/out_proj bias,
# fp32 residual stream, tied embeddings
PHI4_STYLE = dict(norm_type="layernorm", attention_bias=True, residual_in_fp32=True, tie_word_embeddings=True)
CASES = {a: (a, {}) for a in MODEL_ARCHS}
CASES["sambay-da-phi4style"] = ("sambay-da", PHI4_STYLE)
SAMBAY_CASES = ("sambay", "sambay-da", "sambay-da-phi4style")
DEPTHS = [f"d{d}" for d in range(8, 25, 2)]
ATOL = 5e-5  # fp32 logits of unit scale: the fp32 full forward itself is ~2e-5 from float64
PAD = 0


def perturb(model: nn.Module) -> nn.Module:
    """Re-draw the weights so every part matters: unit-gain projections, embeddings of unit
    scale, norms away from 1 with non-zero biases, non-trivial differential-attention lambdas."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, 1 / math.sqrt(mod.in_features))
                if mod.bias is not None:
                    mod.bias.normal_(0, 0.1)
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0, 1)
            elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                mod.weight.uniform_(0.6, 1.4)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.normal_(0, 0.1)
            elif isinstance(mod, nn.Conv1d) and mod.bias is not None:
                mod.bias.normal_(0, 0.1)
            if isinstance(mod, DifferentialCore):
                for p in (mod.lambda_q1, mod.lambda_k1, mod.lambda_q2, mod.lambda_k2):
                    p.normal_(0, 0.3)
            if isinstance(mod, Mamba):
                mod.D.normal_(1, 0.3)
    return model


def make_model(case: str, **overrides) -> PreTrainedModel:
    arch, base = CASES[case] if case in CASES else (case, {})
    cfg = hybrid_lm.config(arch, **{**base, **overrides})
    return perturb(hybrid_lm.build(cfg)).eval()


def rand_ids(*shape, vocab=512):
    return torch.randint(1, vocab, shape)  # never PAD


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = p
        mask[i, n - len(p):] = 1
    return ids, mask


def logits_of(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


def greedy(model, ids, n, mask=None, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                              output_logits=True, return_dict_in_generate=True, **kw)


def assert_tokens_match(got: torch.Tensor, want: torch.Tensor, want_logits: list[torch.Tensor], what: str,
                        tie: float = 1e-4) -> None:
    """got == want token for token; a first difference is accepted only where `want` was a near
    tie (its logits' top two within `tie`), after which the sequences may legitimately diverge."""
    for i in range(want.shape[-1]):
        if got[i] != want[i]:
            lg = want_logits[i]
            gap = float(lg.max() - lg[got[i]])
            assert gap < tie, f"{what}: token {i} is {int(got[i])}, expected {int(want[i])} (logit gap {gap:.2e})"
            return


# -- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_config_every_preset(arch):
    for preset in ("tiny", *DEPTHS, "phi4-mini-flash"):
        try:
            cfg = hybrid_lm.config(arch, preset)
        except ValueError as e:
            # the only impossible presets: SambaY depths not divisible by 4 (d10, d14, d18, d22)
            depth = int(preset[1:]) if preset.startswith("d") else None
            assert arch in ("sambay", "sambay-da") and depth is not None and depth % 4, \
                f"config({arch!r}, {preset!r}) raised: {e}"
            assert "config" in str(e)
            continue
        assert isinstance(cfg, PretrainedConfig)
        assert cfg.differential_attention == (arch == "sambay-da")
        if preset.startswith("d"):
            assert cfg.num_hidden_layers == int(preset[1:])


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_preset(arch):
    cfg = hybrid_lm.config(arch)
    assert cfg.max_position_embeddings >= 2048
    if arch in ("sambay", "sambay-da"):
        assert cfg.num_hidden_layers == 8
        assert cfg.sliding_window == 16
    if arch == "samba":
        assert cfg.sliding_window == 16
    t0 = time.perf_counter()
    model = hybrid_lm.build(hybrid_lm.config(arch))
    took = time.perf_counter() - t0
    assert took < 1.0, f"tiny {arch} took {took:.2f}s to build"
    assert isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin)
    assert callable(model.generate)


@pytest.mark.parametrize("case", ["transformer", "sambay"])
def test_tiny_runs_2048_positions(case):
    """A tiny model takes a 2048-token sequence; the cached last step there equals the full forward."""
    model = make_model(case)
    ids = rand_ids(1, 2048)
    full = logits_of(model, ids, logits_to_keep=1)
    assert full.shape == (1, 1, 512) and torch.isfinite(full).all()
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        last = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(last, full, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_overrides_apply_verbatim(arch):
    kv_heads = 6 if arch == "sambay-da" else 3  # differential attention pairs KV heads
    cfg = hybrid_lm.config(arch, eos_token_id=None, head_dim=None, hidden_size=96, num_attention_heads=6,
                           num_key_value_heads=kv_heads, intermediate_size=200, vocab_size=300)
    assert cfg.eos_token_id is None
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_attention_heads) == (96, 200, 300, 6)
    assert cfg.head_dim == 16
    cfg = hybrid_lm.config(arch, "phi4-mini-flash", eos_token_id=None, bos_token_id=None)
    assert cfg.eos_token_id is None and cfg.bos_token_id is None
    assert hybrid_lm.config(arch, "phi4-mini-flash").eos_token_id == 199999
    # None replaces a preset's non-None value
    assert hybrid_lm.config(arch, rope_theta=None).rope_theta is None
    assert hybrid_lm.config(arch, max_position_embeddings=4096, mamba_d_state=8).mamba_d_state == 8


def test_overrides_none_and_eos_reach_generate():
    """eos_token_id=None means no end token: generation runs to max_new_tokens; an eos stops it."""
    model = make_model("transformer", eos_token_id=None)
    ids = rand_ids(1, 5)
    out = greedy(model, ids, 12)
    assert out.sequences.shape[1] == 17
    eos = int(out.sequences[0, 5 + 3])  # the 4th generated token, made the end token
    model2 = make_model("transformer", eos_token_id=eos)
    model2.load_state_dict(model.state_dict())
    out2 = greedy(model2, ids, 12)
    first = (out.sequences[0, 5:] == eos).nonzero()[0, 0]
    assert out2.sequences.shape[1] == 5 + first + 1


@pytest.mark.parametrize("arch,overrides,match", [
    ("sambay", dict(num_hidden_layers=6), "divisible by 4"),
    ("sambay-da", dict(num_hidden_layers=10), "divisible by 4"),
    ("transformer", dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    ("samba", dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads"),
    ("sambay", dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads|num_attention_heads"),
    # heads that do not divide hidden_size (no head_dim given): 64 / 6
    ("transformer", dict(num_attention_heads=6, num_key_value_heads=2, head_dim=None), "num_attention_heads|hidden_size|head"),
    ("samba", dict(num_attention_heads=3, num_key_value_heads=1, head_dim=None), "num_attention_heads|hidden_size|head"),
])
def test_impossible_configs_raise(arch, overrides, match):
    with pytest.raises(ValueError, match=match):
        hybrid_lm.config(arch, **overrides)


@pytest.mark.parametrize("arch,preset,match", [
    ("gpt2", "tiny", "arch"), ("", "tiny", "arch"), ("Samba", "tiny", "arch"),
    ("transformer", "d9", "preset"), ("samba", "huge", "preset"), ("sambay", "d26", "preset"),
])
def test_unknown_arch_or_preset_raises(arch, preset, match):
    with pytest.raises(ValueError, match=match):
        hybrid_lm.config(arch, preset)


@pytest.mark.parametrize("arch", ["sambay", "sambay-da"])
def test_sambay_tiny_layout(arch):
    model = hybrid_lm.build(hybrid_lm.config(arch))
    mixers = [layer.attn for layer in model.model.layers]
    L = len(mixers)
    assert L == 8
    for i in range(L // 2):
        if i % 2 == 0:
            assert isinstance(mixers[i], Mamba), i
        else:
            assert isinstance(mixers[i], Attention) and not mixers[i].cross and mixers[i].window == 16, i
    assert isinstance(mixers[L // 2], Mamba)
    full = mixers[L // 2 + 1]
    assert isinstance(full, Attention) and full.window is None and not full.cross
    assert isinstance(mixers[6], GMU)
    assert isinstance(mixers[7], Attention) and mixers[7].cross
    assert hasattr(full, "inner_cross_attn") == (arch == "sambay-da")


def test_phi4_mini_flash_config_fields():
    cfg = hybrid_lm.config("sambay-da", "phi4-mini-flash")
    want = dict(vocab_size=200064, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                num_attention_heads=40, num_key_value_heads=20, head_dim=64, max_position_embeddings=262144,
                norm_eps=1e-5, tie_word_embeddings=True, sliding_window=512, mamba_d_state=16, mamba_d_conv=4,
                mamba_expand=2, mamba_dt_rank=160, mamba_conv_bias=True, mamba_proj_bias=False,
                bos_token_id=199999, eos_token_id=199999, pad_token_id=199999, norm_type="layernorm",
                attention_bias=True, rope_theta=None, differential_attention=True, residual_in_fp32=True)
    got = {k: getattr(cfg, k) for k in want}
    assert got == want


# -- registration, save / load -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_classes_registered(arch):
    cfg = hybrid_lm.config(arch)
    assert type(AutoConfig.for_model(cfg.model_type)) is type(cfg)
    model = AutoModelForCausalLM.from_config(cfg)
    assert type(model) is type(hybrid_lm.build(cfg))


@pytest.mark.parametrize("case", [*CASES, "lrt"])
def test_save_pretrained_round_trip(case, tmp_path):
    model = make_model(case)
    ids = rand_ids(2, 23)
    before = logits_of(model, ids)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() or (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("*.bin")), "weights should be safetensors"
    assert not list(tmp_path.glob("*.py")), "no remote code should be needed"
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert type(cfg) is type(model.config)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(cfg.to_dict()) == strip(model.config.to_dict())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    after = logits_of(loaded, ids)
    assert torch.equal(before, after), "save/load round trip changed the logits"
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        from safetensors import safe_open
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys(), "a tied lm_head is absent from the files (as in the release)"
    else:
        assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()


def test_import_registers_for_a_fresh_interpreter(tmp_path):
    """In a new process, `import hybrid_lm` alone lets AutoModelForCausalLM load a saved dir."""
    model = make_model("sambay-da")
    model.save_pretrained(tmp_path)
    ids = rand_ids(1, 9)
    torch.save({"ids": ids, "logits": logits_of(model, ids)}, tmp_path / "ref.pt")
    code = (
        "import sys, torch, hybrid_lm\n"
        "from transformers import AutoModelForCausalLM\n"
        "torch.set_num_threads(1)  # as in this process, for bit-identical logits\n"
        "d = sys.argv[1]\n"
        "m = AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "ref = torch.load(d + '/ref.pt')\n"
        "with torch.no_grad():\n"
        "    out = m(ref['ids']).logits\n"
        "assert torch.equal(out, ref['logits']), 'logits differ'\n"
        "print('OK', type(m).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "OK SambaYForCausalLM" in r.stdout, r.stderr[-3000:]


# -- forward, loss, bad input --------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_forward_logits_and_loss(case):
    model = make_model(case)
    B, T, V = 3, 21, model.config.vocab_size
    ids = rand_ids(B, T)
    out = model(ids)
    assert out.logits.shape == (B, T, V) and out.logits.dtype == torch.float32
    assert out.loss is None
    with torch.no_grad():
        for k in (1, 4):
            kept = model(ids, logits_to_keep=k).logits
            assert kept.shape == (B, k, V)
            torch.testing.assert_close(kept, out.logits[:, -k:], atol=1e-6, rtol=1e-6)
    labels = ids.clone()
    labels[torch.rand(B, T) < 0.3] = -100
    labels[0, 1:6] = -100
    out = model(ids, labels=labels)
    # manual next-token loss: position t predicts labels[t+1]; -100 is ignored; mean over the rest
    logp = torch.log_softmax(out.logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    want = -(logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * keep).sum() / keep.sum()
    torch.testing.assert_close(out.loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, V), tgt.reshape(-1), ignore_index=-100))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("case", CASES)
def test_forward_is_causal(case):
    model = make_model(case)
    ids = rand_ids(2, 30)
    p = 17
    ids2 = ids.clone()
    ids2[:, p] = (ids[:, p] % 511) + 1
    a, b = logits_of(model, ids), logits_of(model, ids2)
    torch.testing.assert_close(a[:, :p], b[:, :p], atol=ATOL, rtol=1e-5)
    assert (a[:, p:] - b[:, p:]).abs().amax() > 1e-3, "a changed token must change later logits"
    # and one 20 tokens back still matters (beyond the sliding window of 16 for the hybrids' SWA)
    ids3 = ids.clone()
    ids3[:, 2] = (ids[:, 2] % 511) + 1
    assert (logits_of(model, ids3)[:, -1] - a[:, -1]).abs().amax() > 1e-4


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises(case):
    model = make_model(case)
    ids = rand_ids(2, 7)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[None])
    for bad in (torch.ones(2, 8), torch.ones(3, 7), torch.ones(2, 6), torch.ones(2, 7, 1)):
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=bad)


@pytest.mark.parametrize("case", ["transformer", "sambay"])
def test_bad_attention_mask_rank_1_raises_value_error(case):
    model = make_model(case)
    ids = rand_ids(2, 7)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(7))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(14))


# -- generation and caches -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_cached_greedy_equals_full_recompute(case):
    """Greedy generation with the cache, 30 tokens from a 10-token prompt (crossing the window of
    16): each token is the argmax of a full forward over everything before it, and the step's
    logits equal that forward's."""
    model = make_model(case)
    P, N = 10, 30
    ids = rand_ids(2, P)
    out = greedy(model, ids, N)
    seq = out.sequences
    assert seq.shape == (2, P + N) and torch.equal(seq[:, :P], ids)
    for i in range(N):
        full = logits_of(model, seq[:, :P + i])[:, -1]
        torch.testing.assert_close(out.logits[i], full, atol=ATOL, rtol=1e-5, msg=lambda m: f"step {i}: {m}")
        tok = seq[:, P + i]
        chosen = full.gather(-1, tok[:, None])[:, 0]
        assert torch.all(chosen >= full.amax(-1) - 1e-4), f"step {i}: {tok} is not the argmax of the recompute"


@pytest.mark.parametrize("case", CASES)
def test_incremental_decode_logits_equal_full_forward(case):
    """Prefill 9 tokens, continue with a chunk of 5, then one token at a time to 41 tokens: every
    call's logits (all the positions it returns) equal the full forward's."""
    model = make_model(case)
    B, T = 2, 41
    ids = rand_ids(B, T)
    full = logits_of(model, ids)
    cache = model.new_cache(B)
    bounds = [0, 9, 14, *range(15, T + 1)]
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:]):
            out = model(ids[:, a:b], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache
            n = out.logits.shape[1]
            assert n in (1, b - a)  # SambaY's cached prefill answers for the last token only
            torch.testing.assert_close(out.logits, full[:, b - n:b], atol=ATOL, rtol=1e-5,
                                       msg=lambda m: f"tokens {a}:{b}: {m}")
    assert cache.get_seq_length() == T


PROMPT_LENS = (14, 11, 4, 13)  # pads 0, 3, 10, 1: differing, odd included


@pytest.mark.parametrize("case", CASES)
def test_left_padded_forward_matches_unpadded(case):
    model = make_model(case)
    prompts = [rand_ids(n) for n in PROMPT_LENS]
    ids, mask = left_pad(prompts)
    got = logits_of(model, ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = logits_of(model, p[None])[0]
        torch.testing.assert_close(got[i, ids.shape[1] - len(p):], alone, atol=ATOL, rtol=1e-5,
                                   msg=lambda m: f"row {i}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_left_padded_incremental_matches_alone(case):
    """A left-padded batch prefilled with its mask, then fed the same continuation one token at a
    time (past the window): each row's logits equal the unpadded row's full forward."""
    model = make_model(case)
    prompts = [rand_ids(n) for n in PROMPT_LENS]
    ids, mask = left_pad(prompts)
    B, N = len(prompts), 22
    cont = rand_ids(B, N)
    refs = [logits_of(model, torch.cat([p, cont[i]])[None])[0] for i, p in enumerate(prompts)]
    cache = model.new_cache(B)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(out.logits[i, -1], refs[i][len(p) - 1], atol=ATOL, rtol=1e-5)
        for t in range(N):
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            out = model(cont[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            for i, p in enumerate(prompts):
                torch.testing.assert_close(out.logits[i, -1], refs[i][len(p) + t], atol=ATOL, rtol=1e-5,
                                           msg=lambda m: f"row {i}, step {t}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_left_padded_generate_matches_alone(case):
    model = make_model(case)
    prompts = [rand_ids(n) for n in PROMPT_LENS]
    ids, mask = left_pad(prompts)
    N = 24
    batch = greedy(model, ids, N, mask)
    assert batch.sequences.shape == (len(prompts), ids.shape[1] + N)
    assert torch.equal(batch.sequences[:, :ids.shape[1]], ids)
    for i, p in enumerate(prompts):
        alone = greedy(model, p[None], N)
        assert_tokens_match(batch.sequences[i, ids.shape[1]:], alone.sequences[0, len(p):],
                            [lg[0] for lg in alone.logits], f"row {i} (pad {ids.shape[1] - len(p)})")
        # while the tokens agree, so do the logits
        for s in range(N):
            if not torch.equal(batch.sequences[i, ids.shape[1]:ids.shape[1] + s],
                               alone.sequences[0, len(p):len(p) + s]):
                break
            torch.testing.assert_close(batch.logits[s][i], alone.logits[s][0], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_sampling_generate(case):
    model = make_model(case)
    prompts = [rand_ids(n) for n in (9, 6, 3)]
    ids, mask = left_pad(prompts)
    N = 20
    kw = dict(attention_mask=mask, max_new_tokens=N, pad_token_id=PAD)
    with torch.no_grad():
        g = model.generate(ids, do_sample=False, **kw)
        # top_k=1 sampling is greedy
        s1 = model.generate(ids, do_sample=True, top_k=1, **kw)
        assert torch.equal(s1, g)
        torch.manual_seed(1234)
        a = model.generate(ids, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, **kw)
        torch.manual_seed(1234)
        b = model.generate(ids, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, **kw)
        torch.manual_seed(4321)
        c = model.generate(ids, do_sample=True, temperature=1.5, top_k=0, top_p=1.0, **kw)
    assert a.shape == (3, ids.shape[1] + N)
    assert torch.equal(a[:, :ids.shape[1]], ids)
    assert torch.equal(a, b), "same seed, same samples"
    assert not torch.equal(a, c), "different seeds should sample differently"
    assert not torch.equal(a, g), "sampling at temperature 1.5 over 512 tokens should not be greedy"
    assert int(a.min()) >= 0 and int(a.max()) < model.config.vocab_size


# -- SambaY: last-token prefill, one growing cache -----------------------------------------------


def record_shapes(model):
    """Forward hooks recording, per decoder layer, (input shape, output shape), and the mixers'
    input shapes."""
    rec: dict = {"in": {}, "out": {}, "mixer_in": {}}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def pre(mod, args, kwargs, i=i):
            rec["in"].setdefault(i, []).append(tuple(args[0].shape))

        def post(mod, args, kwargs, output, i=i):
            out = output[0] if isinstance(output, tuple) else output
            rec["out"].setdefault(i, []).append(tuple(out.shape))

        def mixer_pre(mod, args, kwargs, i=i):
            rec["mixer_in"].setdefault(i, []).append(tuple(args[0].shape))

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                    layer.register_forward_hook(post, with_kwargs=True),
                    layer.attn.register_forward_pre_hook(mixer_pre, with_kwargs=True)]
    return rec, handles


@pytest.mark.parametrize("case", SAMBAY_CASES)
def test_sambay_cached_prefill_runs_cross_decoder_on_last_token(case):
    model = make_model(case)
    L = model.config.num_hidden_layers
    B, T, d = 2, 23, model.config.hidden_size
    ids = rand_ids(B, T)
    rec, handles = record_shapes(model)
    try:
        full = logits_of(model, ids)  # no cache: every layer on every token
        for i in range(L):
            assert rec["in"][i] == [(B, T, d)] and rec["out"][i] == [(B, T, d)], i
        for k in rec:
            rec[k].clear()
        cache = model.new_cache(B)
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True)
        for i in range(L // 2 + 2):  # self-decoder, memory layer, and the shared layer's input: all tokens
            assert rec["in"][i] == [(B, T, d)], i
        assert rec["mixer_in"][L // 2 + 1] == [(B, T, d)], "the shared layer computes K,V of every token"
        assert rec["out"][L // 2 + 1] == [(B, 1, d)], "the full-attention layer's output is last-token only"
        for i in range(L // 2 + 2, L):
            assert rec["in"][i] == [(B, 1, d)], f"cross-decoder layer {i} ran on {rec['in'][i]}"
            assert rec["mixer_in"][i] == [(B, 1, d)], i
        assert cache.layers[L // 2 + 1].k.shape[1] == T
        torch.testing.assert_close(out.logits[:, -1], full[:, -1], atol=ATOL, rtol=1e-5)
        # the same through generate: its first (prefill) call runs the cross-decoder on one token
        for k in rec:
            rec[k].clear()
        greedy(model, ids, 3)
        for i in range(L // 2 + 2, L):
            assert rec["in"][i] == [(B, 1, d)] * 3, f"generate: layer {i} saw {rec['in'][i]}"
        assert rec["in"][0] == [(B, T, d), (B, 1, d), (B, 1, d)]
    finally:
        for h in handles:
            h.remove()


def kv_bytes(cache) -> list[int]:
    return [layer.nbytes(cache.seen) if isinstance(layer, KVCache) else 0 for layer in cache.layers]


@pytest.mark.parametrize("case", SAMBAY_CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_sambay_cache_grows_by_one_full_attention_layer_per_token(case, padded):
    model = make_model(case)
    cfg = model.config
    L, W = cfg.num_hidden_layers, cfg.sliding_window
    prompts = [rand_ids(n) for n in ((20, 17, 19) if padded else (20, 20, 20))]
    ids, mask = left_pad(prompts)
    B = len(prompts)
    cache = model.new_cache(B)
    kw = dict(attention_mask=mask) if padded else {}
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, **kw)
        el = cache.layers[L // 2 + 1].k.element_size()
        per_token_kv = 2 * B * cfg.num_key_value_heads * cfg.head_dim * el
        for step in range(12):
            before, before_kv = cache.nbytes(), kv_bytes(cache)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            if padded:
                kw["attention_mask"] = torch.cat([kw["attention_mask"], torch.ones(B, 1, dtype=mask.dtype)], 1)
            out = model(tok, past_key_values=cache, use_cache=True, **kw)
            after_kv = kv_bytes(cache)
            growth = [a - b for a, b in zip(after_kv, before_kv)]
            assert growth[L // 2 + 1] == per_token_kv, f"step {step}: full-attention layer grew by {growth}"
            assert sum(growth) == per_token_kv, f"step {step}: other KV caches grew: {growth}"
            # everything else the cache holds may grow only by the per-slot validity mask: one
            # element per row, if the cache keeps that mask
            valid_growth = B * cache.valid.element_size() if cache.valid is not None else 0
            assert cache.nbytes() - before == per_token_kv + valid_growth, f"step {step}"
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, KVCache) and i != L // 2 + 1:
            assert layer.k.shape[1] <= W


@pytest.mark.parametrize("case", ["samba", *SAMBAY_CASES])
def test_cache_contents(case):
    """Sliding-window caches stop at the window; the shared layer holds every slot; cross-attention
    and GMU layers hold nothing; Mamba states are fp32 [B, Di, W-1] and [B, Di, N]."""
    model = make_model(case)
    cfg = model.config
    L, W = cfg.num_hidden_layers, cfg.sliding_window
    B, P, N = 2, 12, 30
    out = greedy(model, rand_ids(B, P), N)
    cache = out.past_key_values
    seen = P + N - 1  # the last generated token was never fed back
    assert cache.get_seq_length() == seen
    for i, (layer, mixer) in enumerate(zip(cache.layers, (lay.attn for lay in model.model.layers))):
        if isinstance(mixer, Mamba):
            assert isinstance(layer, MambaState), i
            assert layer.conv.dtype == torch.float32 and layer.ssm.dtype == torch.float32
            assert layer.conv.shape == (B, cfg.mamba_d_inner, cfg.mamba_d_conv - 1)
            assert layer.ssm.shape == (B, cfg.mamba_d_inner, cfg.mamba_d_state)
        elif isinstance(mixer, GMU) or (isinstance(mixer, Attention) and mixer.cross):
            assert layer is None, f"layer {i} ({type(mixer).__name__}) keeps a cache entry"
        elif mixer.window is not None:
            assert isinstance(layer, KVCache) and 0 < layer.k.shape[1] <= W, (i, layer.k.shape)
            assert layer.k.shape == layer.v.shape == (B, layer.k.shape[1], cfg.num_key_value_heads, cfg.head_dim)
        else:
            assert case != "samba" and i == L // 2 + 1
            assert layer.k.shape[1] == seen
    if case != "samba":
        assert [type(x).__name__ for x in cache.layers[L // 2 + 2:]] == ["NoneType"] * (L // 2 - 2)


@pytest.mark.parametrize("case", ["samba", "sambay", "sambay-da"])
def test_mamba_states_stay_fp32_in_a_bf16_model(case):
    model = make_model(case).to(torch.bfloat16)
    out = greedy(model, rand_ids(2, 20), 3)
    assert out.logits[0].dtype in (torch.bfloat16, torch.float32)
    for layer in out.past_key_values.layers:
        if isinstance(layer, MambaState):
            assert layer.conv.dtype == torch.float32 and layer.ssm.dtype == torch.float32
            assert torch.isfinite(layer.ssm).all()
        elif isinstance(layer, KVCache):
            assert layer.k.dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["samba", *SAMBAY_CASES])
def test_left_padding_does_not_leak_into_recurrent_states(case):
    model = make_model(case)
    prompts = [rand_ids(n) for n in (13, 8, 2, 6)]  # pads 0, 5, 11, 7
    ids, mask = left_pad(prompts)
    B = len(prompts)
    cache = model.new_cache(B)
    cont = rand_ids(B, 5)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        alone = []
        for p in prompts:
            c = model.new_cache(1)
            model(p[None], past_key_values=c, use_cache=True)
            alone.append(c)
        for i in range(B):
            for j, layer in enumerate(cache.layers):
                if isinstance(layer, MambaState):
                    ref = alone[i].layers[j]
                    torch.testing.assert_close(layer.conv[i], ref.conv[0], atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(layer.ssm[i], ref.ssm[0], atol=1e-5, rtol=1e-5,
                                               msg=lambda m: f"row {i}, layer {j}: {m}")
        # and still after decoding a few tokens
        for t in range(cont.shape[1]):
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            model(cont[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            for i in range(B):
                model(cont[i:i + 1, t:t + 1], past_key_values=alone[i], use_cache=True)
        for i in range(B):
            for j, layer in enumerate(cache.layers):
                if isinstance(layer, MambaState):
                    torch.testing.assert_close(layer.ssm[i], alone[i].layers[j].ssm[0], atol=1e-5, rtol=1e-5)


# -- parameter counts ----------------------------------------------------------------------------


def phi4_expected_state_dict() -> dict[str, tuple[int, ...]]:
    """Every tensor of Phi-4-mini-flash-reasoning as docs/phi4flash.md lists it."""
    d, di, V, L = 2560, 5120, 200064, 32
    sd: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, d), "model.final_layernorm.weight": (d,),
                                      "model.final_layernorm.bias": (d,)}
    diff = {f"attn.inner_cross_attn.lambda_{x}": (64,) for x in ("q1", "k1", "q2", "k2")}
    diff["attn.inner_cross_attn.subln.weight"] = (128,)
    for n in range(L):
        layer = {"input_layernorm.weight": (d,), "input_layernorm.bias": (d,), "post_attention_layernorm.weight": (d,),
                 "post_attention_layernorm.bias": (d,), "mlp.fc1.weight": (20480, d), "mlp.fc2.weight": (d, 10240)}
        if (n < 16 and n % 2 == 0) or n == 16:
            layer.update({"attn.in_proj.weight": (10240, d), "attn.conv1d.weight": (di, 1, 4),
                          "attn.conv1d.bias": (di,), "attn.x_proj.weight": (192, di), "attn.dt_proj.weight": (di, 160),
                          "attn.dt_proj.bias": (di,), "attn.A_log": (di, 16), "attn.D": (di,),
                          "attn.out_proj.weight": (d, di)})
        elif n <= 17:
            layer.update({"attn.Wqkv.weight": (5120, d), "attn.Wqkv.bias": (5120,), "attn.out_proj.weight": (d, d),
                          "attn.out_proj.bias": (d,), **diff})
        elif n % 2 == 0:
            layer.update({"attn.in_proj.weight": (di, d), "attn.out_proj.weight": (d, di)})
        else:
            layer.update({"attn.Wqkv.weight": (d, d), "attn.Wqkv.bias": (d,), "attn.out_proj.weight": (d, d),
                          "attn.out_proj.bias": (d,), **diff})
        sd.update({f"model.layers.{n}.{k}": v for k, v in layer.items()})
    return sd


def meta_build(cfg):
    with torch.device("meta"):
        return hybrid_lm.build(cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def test_phi4_mini_flash_parameter_count_and_tensors():
    cfg = hybrid_lm.config("sambay-da", "phi4-mini-flash")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as the release: bf16 apart from A_log and the lambdas
    try:
        model = meta_build(cfg)
    finally:
        torch.set_default_dtype(default)
    print(f"\nsambay-da phi4-mini-flash: {n_params(model):,} parameters")
    assert n_params(model) == 3_852_562_944
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = phi4_expected_state_dict()
    assert sum(math.prod(s) for s in expected.values()) == 3_852_562_944  # the list itself is complete
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    for n in (0, 1, 16, 17, 18, 19):  # representative layers first, for a readable failure
        prefix = f"model.layers.{n}."
        assert {k: s for k, s in got.items() if k.startswith(prefix)} == \
               {k: s for k, s in expected.items() if k.startswith(prefix)}, f"layer {n}"
    assert got == expected
    for k, v in sd.items():
        fp32 = k.endswith("A_log") or ".lambda_" in k
        assert v.dtype == (torch.float32 if fp32 else torch.bfloat16), (k, v.dtype)
    mixers = [layer.attn for layer in model.model.layers]
    for n in range(1, 16, 2):
        assert mixers[n].window == 512
    assert mixers[17].window is None and mixers[17].shares_kv
    for n in range(19, 32, 2):
        assert mixers[n].cross
    for n, m in enumerate(mixers):
        if hasattr(m, "inner_cross_attn"):
            assert m.inner_cross_attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * n))


@pytest.mark.parametrize("arch", ARCHS)
def test_depth_presets_grow_with_depth(arch):
    counts = {}
    for preset in DEPTHS:
        try:
            cfg = hybrid_lm.config(arch, preset)
        except ValueError:
            assert arch in ("sambay", "sambay-da") and int(preset[1:]) % 4
            continue
        counts[preset] = n_params(meta_build(cfg))
    counts["phi4-mini-flash"] = n_params(meta_build(hybrid_lm.config(arch, "phi4-mini-flash")))
    print(f"\n{arch}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    depth_counts = [v for k, v in counts.items() if k.startswith("d")]
    assert len(depth_counts) >= 5
    assert all(a < b for a, b in zip(depth_counts, depth_counts[1:])), counts
