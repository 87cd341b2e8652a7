"""Episodes: playing a policy in a pool of browsers, and an episode as the token sequence a language
model reads and writes.

`play(jobs, policy, envs)` runs (task, seed) episodes in a pool of browsers (`browsers(n)`), all in flight at once:
each round asks the policy for one action per running episode (one batched call, so a language
model's requests share one vLLM batch) and steps every browser. A policy is any function from the
running episodes to their next action texts: a scripted expert, or `LMPolicy` over a vLLM engine.

`encode_episode` is the one place that turns an episode into tokens, shared by behaviour cloning,
evaluation and RL so that a model is trained on exactly what it is served. Observations and actions
alternate; every action is " " + its text + the end-of-text token, which is also where generation
stops:

    task: Click on the "Ok" button.\\n[4] div "cursus"\\n[6] button "Ok"\\naction: click(6)<|endoftext|>
    \\n[6] input_text #tt value="Jer"\\naction: ...

The mask marks the tokens the policy wrote (1) against the environment's (0): the loss of
behaviour cloning, and of RL later, is on the policy's tokens only.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

from .env import BrowserError, Page, WebEnv, render_page

MAX_OBS_TOKENS = 200  # per observation; 8 steps of it and their actions fit the tiny presets' 2048 positions
MAX_ACTION_TOKENS = 32


@dataclass
class Step:
    page: Page
    note: str = ""  # e.g. the previous action's "invalid action: ..."
    action: Optional[str] = None
    action_ids: Optional[list[int]] = None  # the tokens a language model generated for it, if one did
    # the sampler's logprob of each generated token (LMPolicy with logprobs=True); one fewer than
    # action_ids when generation hit the token cap and the end-of-text token was appended, not sampled
    action_logprobs: Optional[list[float]] = None


@dataclass
class Episode:
    task: str
    seed: int
    steps: list[Step] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    error: Optional[str] = None  # the browser failed: the episode is lost (reward 0)
    info: dict = field(default_factory=dict)  # how it ended: steps, MiniWoB's raw reward and reason


    def to_dict(self) -> dict:
        return {"task": self.task, "seed": self.seed, "reward": self.reward, "error": self.error, "info": self.info,
                "steps": [{"page": s.page.to_dict(), "note": s.note, "action": s.action} for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> "Episode":
        steps = [Step(Page(s["page"]["utterance"], s["page"]["elements"]), s.get("note", ""), s["action"])
                 for s in d["steps"]]
        return cls(d["task"], int(d["seed"]), steps, float(d["reward"]), True, d.get("error"), d.get("info", {}))


Policy = Callable[[list[Episode]], list[str]]


@contextmanager
def browsers(n: int, max_steps: int = 8) -> Iterator[list[WebEnv]]:
    """A pool of n browsers for `play`, closed on exit."""
    envs = [WebEnv(max_steps) for _ in range(n)]
    try:
        yield envs
    finally:
        for env in envs:
            env.close()


def play(jobs: Sequence[tuple[str, int]], policy: Policy, envs: Sequence[WebEnv], bar=None) -> list[Episode]:
    """Play every (task, seed) job with `policy` in the browsers `envs`, all in flight at once; the
    episodes, in job order. Jobs are taken in order, so jobs grouped by task keep each browser on one
    task for long. A browser that fails loses its episode (recorded with the error) and is replaced."""
    if not envs:
        raise ValueError("play: needs at least one browser")
    queue = deque(enumerate(jobs))
    running: dict[int, tuple[int, Episode]] = {}  # browser slot -> (job index, episode)
    results: list[Optional[Episode]] = [None] * len(jobs)

    def finish(slot: int, index: int, episode: Episode) -> None:
        episode.done = True
        results[index] = episode
        running.pop(slot, None)
        if bar is not None:
            bar.update(1)

    while queue or running:
        # New episodes: every free browser loads its task first (a new browser takes 1-2 s) and only
        # then are they reset, since MiniWoB's 10 s clock starts at the reset.
        starting = {slot: queue.popleft() for slot in range(len(envs)) if slot not in running and queue}
        for phase in ("load", "reset"):
            for slot, (index, (task, seed)) in list(starting.items()):
                try:
                    if phase == "load":
                        envs[slot].load(task)
                    else:
                        running[slot] = (index, Episode(task, seed, [Step(envs[slot].reset(task, seed))]))
                except BrowserError as e:
                    finish(slot, index, Episode(task, seed, error=str(e)))
                    del starting[slot]
        if not running:
            continue
        slots = sorted(running)
        actions = policy([running[s][1] for s in slots])
        for slot, action in zip(slots, actions):
            index, episode = running[slot]
            episode.steps[-1].action = action
            try:
                result = envs[slot].step(action)
            except BrowserError as e:
                episode.error = str(e)
                finish(slot, index, episode)
                continue
            if result.done:
                episode.reward, episode.info = result.reward, result.info
                finish(slot, index, episode)
            else:
                episode.steps.append(Step(result.page, result.note))
    return results


def encode_episode(tokenizer, steps: Sequence[Step], max_obs_tokens: int = MAX_OBS_TOKENS,
                   history: Optional[int] = None) -> tuple[list[int], list[int]]:
    """(token ids, mask) of an episode's steps: each observation (mask 0) then its action, if taken
    (mask 1): the tokens a model generated when it has them, else " " + text + end-of-text.
    history: keep only the last `history` observations in full; older pages shrink to a
    placeholder, "(N more elements)" (their utterance, note and action stay)."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    ids: list[int] = []
    mask: list[int] = []
    for i, step in enumerate(steps):
        old = history is not None and i < len(steps) - history
        obs = tokenizer.encode(render_page(step.page, count, 0 if old else max_obs_tokens, step.note, first=i == 0),
                               add_special_tokens=False)
        ids += obs
        mask += [0] * len(obs)
        if step.action is not None:
            act = step.action_ids if step.action_ids is not None else (
                tokenizer.encode(" " + step.action, add_special_tokens=False) + [tokenizer.eos_token_id])
            ids += act
            mask += [1] * len(act)
    return ids, mask


class LMPolicy:
    """A language model served by vLLM as a `play` policy: each running episode's tokens so far are
    one prompt (token ids; vLLM's prefix cache serves the history), and the generation up to the
    end-of-text token is the action. seed None: every request samples independently (RL groups
    of one task instance); logprobs=True keeps each generated token's logprob (Step.action_logprobs)."""

    def __init__(self, llm, tokenizer, max_obs_tokens: int = MAX_OBS_TOKENS,
                 max_action_tokens: int = MAX_ACTION_TOKENS, temperature: float = 0.0, seed: Optional[int] = 0,
                 logprobs: bool = False, history: Optional[int] = None):
        from vllm import SamplingParams

        self.llm, self.tokenizer, self.max_obs_tokens, self.history = llm, tokenizer, max_obs_tokens, history
        self.max_len = llm.llm_engine.vllm_config.model_config.max_model_len
        self.params = SamplingParams(temperature=temperature, max_tokens=max_action_tokens, seed=seed,
                                     stop_token_ids=[tokenizer.eos_token_id], logprobs=0 if logprobs else None)
        self.max_action_tokens = max_action_tokens
        # the engine's first call is slow (warm-up): not inside an episode, where MiniWoB's clock runs
        llm.generate([{"prompt_token_ids": [tokenizer.eos_token_id] * 8}], SamplingParams(max_tokens=2), use_tqdm=False)

    def __call__(self, episodes: list[Episode]) -> list[str]:
        prompts = [encode_episode(self.tokenizer, ep.steps, self.max_obs_tokens, self.history)[0] for ep in episodes]
        too_long = [len(p) for p in prompts if len(p) + self.max_action_tokens > self.max_len]
        if too_long:
            raise ValueError(f"an episode's prompt of {max(too_long)} tokens plus {self.max_action_tokens} action tokens "
                             f"exceeds the engine's max_model_len {self.max_len}: lower --max-obs-tokens or the step cap")
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self.params, use_tqdm=False)
        actions = []
        eos = self.tokenizer.eos_token_id
        for ep, out in zip(episodes, outs):
            ids = list(out.outputs[0].token_ids)
            if out.outputs[0].logprobs is not None:
                ep.steps[-1].action_logprobs = [lp[t].logprob for t, lp in zip(ids, out.outputs[0].logprobs)]
            if not ids or ids[-1] != eos:  # cut at max_action_tokens: end it as training data would
                ids.append(eos)
            ep.steps[-1].action_ids = ids
            actions.append(self.tokenizer.decode(ids[:-1]).strip())
        return actions


def max_model_len(max_steps: int, max_obs_tokens: int, max_action_tokens: int, limit: int) -> int:
    """Positions an episode can need (its observations carry a little more than their element budget:
    the utterance and a note), capped by the model's own limit."""
    return min(limit, max_steps * (max_obs_tokens + max_action_tokens) + 64)

