"""The environment in real Chromium: observations, actions, invalid actions, browser restarts and
the experts; and the text side (parsing, rendering, token encoding) on its own."""
import random

import pytest

from hybrid_lm.agent.env import InvalidAction, Page, WebEnv, element_line, parse_action, render_page
from hybrid_lm.agent.episodes import Episode, Step, browsers, encode_episode, play
from hybrid_lm.agent.experts import DEFAULT_TASKS, EXPERTS, expert_policy


def words(text: str) -> int:
    return len(text.split())


PAGE = Page('Click on the "Ok" button.', [
    {"ref": 1, "parent": 0, "tag": "body", "text": "", "value": "", "id": "", "classes": ""},
    {"ref": 3, "parent": 1, "tag": "div", "text": "", "value": "", "id": "area", "classes": ""},
    {"ref": 4, "parent": 3, "tag": "div", "text": "cursus dis", "value": "", "id": "", "classes": ""},
    {"ref": 5, "parent": 3, "tag": "input_text", "text": "", "value": "Jer", "id": "tt", "classes": ""},
    {"ref": 6, "parent": 3, "tag": "button", "text": "Ok", "value": "", "id": "", "classes": ""},
    {"ref": 7, "parent": 3, "tag": "input_checkbox", "text": "", "value": "True", "id": "ch0", "classes": ""},
    {"ref": -1, "parent": 3, "tag": "t", "text": "label", "value": "", "id": "", "classes": ""},
])


def test_element_lines():
    assert element_line(PAGE.elements[0]) is None and element_line(PAGE.elements[1]) is None
    assert element_line(PAGE.elements[2]) == '[4] div "cursus dis"'
    assert element_line(PAGE.elements[3]) == '[5] input_text #tt value="Jer"'
    assert element_line(PAGE.elements[5]) == "[7] input_checkbox #ch0 checked"
    assert element_line(PAGE.elements[6]) == '[-1] t "label"'


def test_render_caps_elements_at_the_budget():
    full = render_page(PAGE, words, 1000)
    assert full.startswith('task: Click on the "Ok" button.\n[4] div') and full.endswith("\naction:")
    capped = render_page(PAGE, words, 14)
    assert words(capped) <= 14 and "more elements)" in capped
    assert capped.splitlines()[1] == '[4] div "cursus dis"'  # document order: the first lines are kept
    later = render_page(PAGE, words, 1000, note="invalid action: x", first=False)
    assert later.startswith("\ninvalid action: x\n[4]") and "task:" not in later


@pytest.mark.parametrize("text, expected", [
    ("click(6)", "click(6)"), ("  click( 6 ) ", "click(6)"), ('type(5, "a \\"b\\"")', 'type(5, "a \\"b\\"")'),
])
def test_parse_valid_actions(text, expected):
    assert str(parse_action(text, PAGE)) == expected


@pytest.mark.parametrize("text, reason", [
    ("clik(6)", "expected click(ref)"), ("click(99)", "no element [99]"), ("click(-1)", "is text"),
    ('type(6, "x")', "is a button, not a text field"), ('type(5, "' + "x" * 65 + '")', "at most 64"),
    ("click(6) click(4)", "expected click(ref)"), ("", "expected click(ref)"),
])
def test_parse_invalid_actions(text, reason):
    with pytest.raises(InvalidAction, match="invalid action") as e:
        parse_action(text, PAGE)
    assert reason in str(e.value)


class WordTokenizer:
    """Enough of a tokenizer for encode_episode: one id per character, eos 0."""
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_encoding_masks_exactly_the_actions():
    tok = WordTokenizer()
    steps = [Step(PAGE, action="click(7)"), Step(PAGE, note="n", action='type(5, "x")', action_ids=[ord("z"), 0]),
             Step(PAGE)]
    ids, mask = encode_episode(tok, steps, 10_000)
    policy = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(policy) == " click(7)\x00z\x00"
    assert tok.decode(ids).endswith("action:") and mask[-1] == 0
    assert len(ids) == len(mask)
    starts = [i for i in range(len(mask)) if mask[i] and not mask[i - 1]]
    assert len(starts) == 2 and all(tok.decode(ids[:i]).endswith("action:") for i in starts)  # each after its observation


# ---------------------------------------------------------------------------------------------
# in Chromium
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env():
    env = WebEnv(max_steps=3)
    yield env
    env.close()


def test_reset_gives_utterance_and_refs(env):
    page = env.reset("click-button", 1234)
    assert "button" in page.utterance
    buttons = [e for e in page.elements if e["tag"] == "button"]
    assert buttons and all(isinstance(e["ref"], int) and e["ref"] > 0 for e in buttons)
    text = render_page(page, words, 500)
    assert all(f"[{e['ref']}] button" in text for e in buttons)


def test_expert_action_succeeds(env):
    for task in ("click-button", "enter-text"):
        page = env.reset(task, 77)
        for _ in range(3):
            result = env.step(EXPERTS[task](page))
            if result.done:
                break
            page = result.page
        assert result.done and result.reward == 1.0


def test_invalid_action_is_an_observation_and_a_step(env):
    env.reset("click-button", 5)
    result = env.step("click(12345)")
    assert not result.done and result.note.startswith("invalid action:") and "no element [12345]" in result.note
    assert "invalid action:" in render_page(result.page, words, 500, result.note, first=False)
    result = env.step("press the ok button")
    assert not result.done and "expected click(ref)" in result.note
    result = env.step("click(-1)")  # the third step reaches the step cap of this env
    assert result.done and result.reward == 0.0 and result.page is None


def test_killed_browser_is_restarted():
    with browsers(1) as envs:
        def crashing(episodes):  # the first episode's browser dies before its action is sent
            if episodes[0].seed == 0:
                envs[0].kill()
            return expert_policy(episodes)

        result = play([("click-test", s) for s in range(3)], crashing, envs)
    assert result[0].error is not None and "browser failed" in result[0].error and result[0].reward == 0.0
    assert [ep.reward for ep in result[1:]] == [1.0, 1.0] and all(ep.error is None for ep in result[1:])


def test_experts_succeed_on_95_percent_of_20_seeds():
    seeds = random.Random(0).sample(range(10_000), 20)
    with browsers(1) as envs:
        episodes = play([(task, seed) for task in DEFAULT_TASKS for seed in seeds], expert_policy, envs)
    for task in DEFAULT_TASKS:
        rewards = [ep.reward for ep in episodes if ep.task == task]
        assert len(rewards) == 20 and sum(rewards) >= 19, (task, rewards)
    assert all(isinstance(Episode.from_dict(ep.to_dict()), Episode) for ep in episodes[:3])
