"""The chat page in a real browser: Chinese labels with a 中/EN toggle; headless Chromium types a message and
sees the answer stream in."""

import os

import pytest

from .conftest import BROWSER_MISSING
from .server import running_server

if BROWSER_MISSING:  # the `browser` fixture (tests/conftest.py) drives headless Chromium
    if os.environ.get("CI"):
        pytest.fail("CI must run the browser test: " + BROWSER_MISSING, pytrace=False)
    pytest.skip(BROWSER_MISSING, allow_module_level=True)


def check_labels_and_language_toggle(browser):
    """Chinese labels first; the 中/EN button switches to English and the choice survives a reload."""
    from selenium.webdriver.common.by import By

    def labels():
        find = browser.find_element
        return (find(By.ID, "send").text, find(By.ID, "reset").text, find(By.ID, "lang").text,
                find(By.ID, "input").get_attribute("placeholder"), find(By.ID, "key").get_attribute("placeholder"))

    chinese = ("发送", "新对话", "EN", "问问神奇海螺…（Enter 发送，Shift+Enter 换行）",
               "API 密钥（需要时填写）")
    english = ("Send", "New chat", "中", "Ask the Magic Conch… (Enter to send, Shift+Enter for a new line)",
               "API key (if the server needs one)")
    browser.execute_script("localStorage.removeItem('conch-lang')")
    browser.refresh()
    assert labels() == chinese
    browser.find_element(By.ID, "lang").click()
    assert labels() == english
    assert browser.execute_script("return document.documentElement.lang") == "en"
    browser.refresh()
    assert labels() == english  # remembered in localStorage
    browser.find_element(By.ID, "lang").click()
    assert labels() == chinese
    assert browser.execute_script("return localStorage.getItem('conch-lang')") == "zh"


def test_page_streams_an_answer(browser, demo_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running_server(demo_path, "--default_max_tokens", "24") as url:
        browser.get(url + "/")
        assert "神奇海螺" in browser.title
        check_labels_and_language_toggle(browser)
        browser.find_element(By.ID, "input").send_keys("What is the capital of France?")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 90).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true'], .error"))
        answers = browser.find_elements(By.CSS_SELECTOR, ".assistant")
        assert answers and not browser.find_elements(By.CSS_SELECTOR, ".error")
        assert "Paris" in answers[-1].text
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "What is the capital of France?"
