"""MiniWoB++ in headless Chromium, seen and driven as text.

A `WebEnv` is one browser (MiniWoB's Gymnasium environment, which drives Debian's Chromium through
Selenium) playing one task at a time. What a policy sees is a `Page`: the task's utterance and the
DOM elements MiniWoB reports, rendered by `render_page` as one line per element, in document order:

    [6] button "Ok"
    [8] input_checkbox #ch1 checked
    [-2] t "GDKkQ"

(ref, tag, `#id` when the element has one, its text, and an input's value or checked state;
negative refs are MiniWoB's text pseudo-elements). What a policy does is a line of text:

    click(ref)              click the element (focuses a field, toggles a checkbox, follows a link)
    type(ref, "text")       click the field, then type the text (JSON string escapes)

A malformed or impossible action (unparseable, a ref not on the page, typing into a button) is not
sent to the browser: it costs a step and comes back as an observation "invalid action: ...". An
episode ends when MiniWoB says the task is over (success, failure or its 10 s timeout) or at the
step cap; the reward is 1 on task success (MiniWoB's raw reward of 1, without its time discount)
and 0 otherwise.

Browsers are slow to start (about 1 s) and cheap to reuse (a reset is about 0.1 s), so a
`BrowserPool` keeps N of them across episodes. A browser that crashes or hangs (a call that does not
return within `hang_s` is killed) is replaced, and only its episode is lost: it ends with reward 0
and the error recorded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from typing import Optional

MAX_STEPS = 8
# Seeds: training episodes use seeds from 0, evaluation from EVAL_SEED, so demonstrations and
# held-out evaluation never share a page as long as fewer than EVAL_SEED training episodes are drawn.
EVAL_SEED = 1_000_000
TYPE_MAX_CHARS = 64  # MiniWoB's typing limit (miniwob.constants.TYPING_MAX_LENGTH)
TEXT_FIELDS = ("input_text", "input_password", "input_email", "input_number", "input_search", "input_tel",
               "input_url", "textarea")
# elements shown even without text: the ones an action can target
CONTROLS = ("button", "a", "select", "option", "textarea")
TEXT_CHARS = 80  # an element's text is cut to this many characters in the rendering (marked "...")


# ---------------------------------------------------------------------------------------------
# the browser
# ---------------------------------------------------------------------------------------------

def find_chromium() -> None:
    """Point MiniWoB at Chromium and its driver: MINIWOB_CHROME_BINARY and MINIWOB_CHROMEDRIVER are set
    from PATH when unset; a clear error names what to install when they cannot be found."""
    if os.environ.get("MINIWOB_CHROME_BINARY") and os.environ.get("MINIWOB_CHROMEDRIVER"):
        return
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", binary), ("chromedriver", driver)) if p is None)
        raise RuntimeError(f"MiniWoB needs Chromium and its driver; {missing} not found on PATH. Install them "
                           "(Debian: apt-get install chromium chromium-driver) or set MINIWOB_CHROME_BINARY and "
                           "MINIWOB_CHROMEDRIVER")
    os.environ.setdefault("MINIWOB_CHROME_BINARY", binary)
    os.environ.setdefault("MINIWOB_CHROMEDRIVER", driver)


def env_id(task: str) -> str:
    """The Gymnasium id of a MiniWoB task named as MiniWoB spells it: click-button -> miniwob/click-button-v1."""
    return f"miniwob/{task}-v1"


def check_tasks(tasks: list[str]) -> list[str]:
    """The tasks, refused with the known names when one is not a MiniWoB task."""
    import gymnasium
    import miniwob

    gymnasium.register_envs(miniwob)
    known = sorted(k.removeprefix("miniwob/").removesuffix("-v1") for k in gymnasium.registry if k.startswith("miniwob/"))
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"--tasks: {', '.join(unknown)} not MiniWoB task(s) (names as MiniWoB spells them, without "
                         f"prefix or version, e.g. click-button); known: {', '.join(known)}")
    return tasks


# ---------------------------------------------------------------------------------------------
# observations
# ---------------------------------------------------------------------------------------------

@dataclass
class Page:
    """What the page shows: the task's utterance and its DOM elements (dicts with ref, parent, tag,
    text, value, id, classes), in document order."""
    utterance: str
    elements: list[dict]

    @classmethod
    def from_observation(cls, obs: dict) -> "Page":
        keys = ("ref", "parent", "tag", "text", "value", "id", "classes")
        return cls(str(obs["utterance"]), [{k: _plain(e[k]) for k in keys} for e in obs["dom_elements"]])

    def element(self, ref: int) -> Optional[dict]:
        return next((e for e in self.elements if e["ref"] == ref), None)

    def to_dict(self) -> dict:
        return {"utterance": self.utterance, "elements": self.elements}


def _plain(value):
    """numpy scalars and arrays from MiniWoB's spaces as JSON-able Python values."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else (
        value.tolist() if hasattr(value, "tolist") else value)


def element_line(e: dict) -> Optional[str]:
    """One element's line, or None for an element with nothing to show (an empty container)."""
    tag, text, value = e["tag"], e["text"].strip(), e["value"]
    if tag == "body" or not (text or value or tag in CONTROLS or tag.startswith("input_")):
        return None
    parts = [f"[{e['ref']}]", tag]
    if e["id"]:
        parts.append(f"#{e['id']}")
    if text:
        parts.append(json.dumps(text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "..."))
    if tag in ("input_checkbox", "input_radio"):
        parts.append("checked" if value in (True, "True", "true") else "unchecked")
    elif value:
        parts.append(f"value={json.dumps(value)}")
    return " ".join(parts)


def render_page(page: Page, count_tokens, max_tokens: int, note: str = "", first: bool = True) -> str:
    """The observation text: the utterance (first observation only), a note (such as an invalid
    action's), then element lines until max_tokens (as counted by count_tokens) would be exceeded;
    the elements left out are counted in a last line."""
    head = (f"task: {page.utterance}\n" if first else "\n") + (f"{note}\n" if note else "")
    lines = [line for line in map(element_line, page.elements) if line is not None]
    budget = max_tokens - count_tokens(head) - count_tokens("action:")
    kept = []
    for i, line in enumerate(lines):
        cost = count_tokens(line + "\n")
        rest = len(lines) - i - 1
        if cost > budget - (count_tokens(f"({rest} more elements)\n") if rest else 0):
            kept.append(f"({len(lines) - i} more elements)")
            break
        kept.append(line)
        budget -= cost
    return head + "".join(line + "\n" for line in kept) + "action:"


# ---------------------------------------------------------------------------------------------
# actions
# ---------------------------------------------------------------------------------------------

class InvalidAction(ValueError):
    """An action the page cannot take; its message becomes the next observation's note."""


@dataclass
class Action:
    kind: str  # "click" or "type"
    ref: int
    text: str = ""

    def __str__(self) -> str:
        return f"click({self.ref})" if self.kind == "click" else f"type({self.ref}, {json.dumps(self.text)})"


_CLICK = re.compile(r"\s*click\(\s*(-?\d+)\s*\)\s*")
_TYPE = re.compile(r"\s*type\(\s*(-?\d+)\s*,\s*(\"(?:[^\"\\]|\\.)*\")\s*\)\s*")


def parse_action(text: str, page: Page) -> Action:
    """The action a line of text names, checked against the page; InvalidAction says why not."""
    shown = text.strip()[:80]
    if m := _CLICK.fullmatch(text):
        action = Action("click", int(m[1]))
    elif m := _TYPE.fullmatch(text):
        try:
            typed = json.loads(m[2])
        except json.JSONDecodeError:
            raise InvalidAction(f"invalid action: {shown!r}: bad string {m[2]}") from None
        action = Action("type", int(m[1]), typed)
    else:
        raise InvalidAction(f'invalid action: {shown!r}: expected click(ref) or type(ref, "text")')
    e = page.element(action.ref)
    if e is None:
        raise InvalidAction(f"invalid action: {shown!r}: no element [{action.ref}] on the page")
    if action.ref < 0:
        raise InvalidAction(f"invalid action: {shown!r}: [{action.ref}] is text, not an element")
    if action.kind == "type":
        if e["tag"] not in TEXT_FIELDS:
            raise InvalidAction(f"invalid action: {shown!r}: [{action.ref}] is a {e['tag']}, not a text field")
        if len(action.text) > TYPE_MAX_CHARS:
            raise InvalidAction(f"invalid action: {shown!r}: at most {TYPE_MAX_CHARS} characters can be typed")
    return action


# ---------------------------------------------------------------------------------------------
# one browser
# ---------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    page: Optional[Page]  # None once the episode is over
    reward: float
    done: bool
    note: str = ""  # "invalid action: ..." when the action was not taken
    info: dict = field(default_factory=dict)


class WebEnv:
    """One headless Chromium playing MiniWoB tasks; `reset(task, seed)` starts an episode (loading
    the task first when needed: `load`), `step(text)` takes a text action. Browser failures raise
    BrowserError."""

    def __init__(self, max_steps: int = MAX_STEPS, hang_s: float = 60.0):
        find_chromium()
        self.max_steps, self.hang_s = max_steps, hang_s
        self.task: Optional[str] = None
        self._env = None
        self.page: Optional[Page] = None
        self.steps = 0
        self.broken = False  # the last call failed: the browser is killed, not closed, and replaced

    def load(self, task: str) -> None:
        """Have a browser showing `task`'s page: started, switched or, after a failure, replaced."""
        # FlightWoB tasks are served over HTTP in a bigger window: those get a browser of their own
        flight = task.startswith("flight.") or (self.task or "").startswith("flight.")
        if self._env is None or self.broken or (task != self.task and flight):
            self.close()
            self._env = self._guarded(_make_env, task)
        elif task != self.task:
            self._guarded(_switch_task, self._env, task)
        self.task = task

    def reset(self, task: str, seed: int) -> Page:
        """Start an episode of `task` on `seed`; MiniWoB's clock starts now."""
        self.load(task)
        obs, _ = self._guarded(self._env.reset, seed=seed, options={"record_screenshots": False})
        self.page, self.steps = Page.from_observation(obs), 0
        return self.page

    def step(self, text: str) -> StepResult:
        if self.page is None:
            raise RuntimeError("step() before reset(), or after the episode ended")
        note = ""
        try:
            action = parse_action(text, self.page)
            raw = self._send(action)
        except InvalidAction as e:
            note = str(e)
            raw = self._send(None)  # the page may still change (timers): observe it afresh
        self.steps += 1
        obs, reward, done, _, info = raw
        success = done and float(info.get("raw_reward", reward)) >= 1.0
        if done or self.steps >= self.max_steps:
            self.page = None
            return StepResult(None, 1.0 if success else 0.0, True, note, info=_info(info, self.steps))
        self.page = Page.from_observation(obs)
        return StepResult(self.page, 0.0, False, note)

    def _send(self, action: Optional[Action]):
        env = self._env.unwrapped
        if action is None:
            act = env.create_action("NONE")
        elif action.kind == "click":
            act = env.create_action("CLICK_ELEMENT", ref=action.ref)
        else:
            act = env.create_action("FOCUS_ELEMENT_AND_TYPE_TEXT", ref=action.ref, text=action.text)
        return self._guarded(self._env.step, act)

    def _guarded(self, fn, *args, **kwargs):
        """fn(*args) with a watchdog: a browser that hangs past hang_s is killed, so the call fails."""
        timer = threading.Timer(self.hang_s, self.kill)
        timer.start()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.broken = True
            raise BrowserError(f"{self.task}: browser failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
        finally:
            timer.cancel()

    def kill(self) -> None:
        """Kill the browser outright (a hung one): calls in flight then fail."""
        _kill(self._env)

    def close(self) -> None:
        env, self._env, self.task, self.page = self._env, None, None, None
        if env is not None:
            if self.broken:  # a crashed or hung browser cannot be closed politely
                _kill(env)
            else:
                env.close()
        self.broken = False


class BrowserError(RuntimeError):
    """The browser crashed or hung; the episode in it is lost."""


def _make_env(task: str):
    import gymnasium
    import miniwob
    from miniwob.reward import get_raw_reward

    gymnasium.register_envs(miniwob)
    return gymnasium.make(env_id(task), render_mode=None, reward_processor=get_raw_reward)


def _switch_task(env, task: str) -> None:
    """Load another task's page in the same browser (0.2 s, against 1-2 s for a new browser). MiniWoB
    ties an environment to one task, so this sets the three things that depend on it: the page's
    URL, the task's field extractor, and the environment's task name."""
    from miniwob.fields import get_field_extractor
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    inst = env.unwrapped.instance
    inst.url = inst.url.rsplit("/", 1)[0] + f"/{task}.html"
    inst.field_extractor = get_field_extractor(task)
    env.unwrapped.subdomain = task
    inst.driver.get(inst.url)
    WebDriverWait(inst.driver, 5).until(expected_conditions.element_to_be_clickable((By.ID, inst.SYNC_SCREEN_ID)))


def _info(info: dict, steps: int) -> dict:
    return {"steps": steps, "raw_reward": float(info.get("raw_reward", 0.0)), "reason": _plain(info.get("reason"))}


def _browser_pids(env) -> list[int]:
    try:
        root = env.unwrapped.instance.driver.service.process.pid
    except AttributeError:  # no browser (never started, or already torn down)
        return []
    return [root] + _children(root)


def _kill(env) -> None:
    for pid in reversed(_browser_pids(env)):
        try:
            os.kill(pid, 9)
        except OSError:  # already gone
            pass


def _children(pid: int) -> list[int]:
    """Every descendant of a process (Linux /proc), parents before children."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found
