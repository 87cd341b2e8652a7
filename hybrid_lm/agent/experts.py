"""Scripted experts: one per default task, each reading the page and returning the next text action.

An expert is a plain function Page -> action text. It keeps no memory: the page says what is done
already (a field's value, a box's checked state), so an expert also recovers from a page left half
done. The default task set rises in difficulty: one click on the only button, one click picked by
its text, then two- and three-step tasks (a radio button or checkboxes then Submit, a form, a login).
"""
from __future__ import annotations

import re
from typing import Callable

from .env import Action, Page

DEFAULT_TASKS = ("click-test", "click-button", "click-link", "click-tab", "focus-text", "click-dialog",
                 "click-option", "enter-text", "click-checkboxes", "login-user")


def _quoted(utterance: str) -> list[str]:
    return re.findall(r'"([^"]*)"', utterance)


def _by_text(page: Page, text: str, tags: tuple[str, ...]) -> dict:
    return next(e for e in page.elements if e["tag"] in tags and e["text"].strip() == text)


def _checked(e: dict) -> bool:
    return e["value"] in (True, "True", "true")


def _box_for_label(page: Page, label: str) -> dict:
    """The checkbox or radio button whose label (a text node under the same <label>) reads `label`."""
    text = next(e for e in page.elements if e["tag"] == "t" and e["text"].strip() == label)
    return next(e for e in page.elements if e["parent"] == text["parent"] and e["tag"] in ("input_checkbox", "input_radio"))


def _submit(page: Page, label: str = "Submit") -> str:
    return str(Action("click", _by_text(page, label, ("button",))["ref"]))


def click_test(page: Page) -> str:
    return str(Action("click", next(e for e in page.elements if e["tag"] == "button")["ref"]))


def click_button(page: Page) -> str:  # Click on the "Ok" button.
    return str(Action("click", _by_text(page, _quoted(page.utterance)[0], ("button",))["ref"]))


def click_link(page: Page) -> str:  # Click on the link "nam".
    return str(Action("click", _by_text(page, _quoted(page.utterance)[0], ("span", "a"))["ref"]))


def click_tab(page: Page) -> str:  # Click on Tab #1.
    name = re.search(r"Click on (Tab #\d+)", page.utterance)[1]
    return str(Action("click", _by_text(page, name, ("a",))["ref"]))


def focus_text(page: Page) -> str:  # Focus into the textbox.
    return str(Action("click", next(e for e in page.elements if e["tag"] == "input_text")["ref"]))


def click_dialog(page: Page) -> str:  # Close the dialog box by clicking the "x".
    close = next(e for e in page.elements if e["tag"] == "button" and "titlebar-close" in e["classes"])
    return str(Action("click", close["ref"]))


def click_option(page: Page) -> str:  # Select GDKkQ and click Submit.
    box = _box_for_label(page, re.search(r"Select (.*) and click Submit", page.utterance)[1])
    return _submit(page) if _checked(box) else str(Action("click", box["ref"]))


def enter_text(page: Page) -> str:  # Enter "Jerald" into the text field and press Submit.
    field = next(e for e in page.elements if e["tag"] == "input_text")
    text = _quoted(page.utterance)[0]
    return _submit(page) if field["value"] == text else str(Action("type", field["ref"], text))


def click_checkboxes(page: Page) -> str:  # Select 91YPF, i6Vdpn2 and click Submit. / Select nothing and click Submit.
    wanted = re.search(r"Select (.*) and click Submit", page.utterance)[1]
    labels = [] if wanted == "nothing" else [w.strip() for w in wanted.split(",")]
    for box in (_box_for_label(page, label) for label in labels):
        if not _checked(box):
            return str(Action("click", box["ref"]))
    return _submit(page)


def login_user(page: Page) -> str:  # Enter the username "vina" and the password "US" into the text fields and press login.
    username, password = _quoted(page.utterance)[:2]
    for field_id, text in (("username", username), ("password", password)):
        field = next(e for e in page.elements if e["id"] == field_id)
        if field["value"] != text:
            return str(Action("type", field["ref"], text))
    return _submit(page, "Login")


EXPERTS: dict[str, Callable[[Page], str]] = {
    "click-test": click_test, "click-button": click_button, "click-link": click_link, "click-tab": click_tab,
    "focus-text": focus_text, "click-dialog": click_dialog, "click-option": click_option, "enter-text": enter_text,
    "click-checkboxes": click_checkboxes, "login-user": login_user,
}
assert set(EXPERTS) == set(DEFAULT_TASKS)


def expert_policy(episodes) -> list[str]:
    """The policy of `play` that asks each episode's task expert for its next action."""
    return [EXPERTS[ep.task](ep.steps[-1].page) for ep in episodes]
