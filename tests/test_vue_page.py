"""The Vue chat page (examples/vue), built with Vite, served from its own origin and driven in headless
Chromium against `conch serve --cors_origins <that origin>`: streaming, reasoning fold, RAG sources, errors,
Chinese labels and the 中/EN toggle."""

import functools
import os
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conch.serve import BackgroundServer

VUE_DIR = Path(__file__).resolve().parents[1] / "examples" / "vue"
KNOWLEDGE = Path(__file__).resolve().parents[1] / "data" / "knowledge"
KEY = "krabby-patty-secret"
NPM = shutil.which("npm")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")

if not (NPM and shutil.which("node") and CHROMIUM and DRIVER):
    message = ("needs Node.js with npm, Chromium and chromedriver "
               "(Debian: apt-get install nodejs npm chromium chromium-driver; `make browser examples`)")
    if os.environ.get("CI"):
        pytest.fail("CI must run the Vue page test: " + message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def npm(*args):
    done = subprocess.run([NPM, *args], cwd=VUE_DIR, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"npm {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """`npm ci` (once, from the lockfile) and `vite build` into a fresh folder."""
    if not (VUE_DIR / "node_modules").is_dir():
        npm("ci", "--no-audit", "--no-fund")
    out = tmp_path_factory.mktemp("vue") / "dist"
    npm("run", "build", "--", "--outDir", str(out), "--emptyOutDir")
    assert (out / "index.html").is_file()
    return out


@pytest.fixture(scope="module")
def origin(dist):
    """dist/ on its own origin (a static server on 127.0.0.1), as a separate front end would be."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(dist))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def conch(model, origin, *args):
    return BackgroundServer(model, "--cors_origins", origin, *args,
                            env={"CONCH_THREADS": os.environ.get("CONCH_THREADS", "1")})


@pytest.fixture(scope="module")
def rag_server(demo_path, origin):
    """The demo model behind a key, answering from data/knowledge (RAG mode: sources in the first chunk)."""
    with conch(demo_path, origin, "--api_key", KEY, "--rag_dir", str(KNOWLEDGE)) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,700", "--lang=zh-CN"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def ask(browser, url, question, key=None, state="done"):
    """Open the page, type the key and the question, send it; the last answer once it is no longer streaming."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.ID, "question"))
    if key is not None:
        browser.find_element(By.ID, "api-key").clear()
        browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 180).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant:not([data-state='streaming'])"))
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


CHINESE = ("发送", "EN", "问神奇海螺…（Enter 发送，Shift+Enter 换行）", "API 密钥（API key）",
           "服务器的 --api_key（留空：不需要）")
ENGLISH = ("Send", "中", "Ask the Magic Conch… (Enter to send, Shift+Enter for a new line)", "API key",
           "the server's --api_key (empty: none)")


def labels(browser):
    from selenium.webdriver.common.by import By

    find = browser.find_element
    return (find(By.ID, "send").text, find(By.ID, "lang").text, find(By.ID, "question").get_attribute("placeholder"),
            find(By.CSS_SELECTOR, "label.key").text.strip(), find(By.ID, "api-key").get_attribute("placeholder"))


def test_the_page_logic_passes_its_node_tests(dist):
    assert "# fail 0" in npm("test")


def test_a_chinese_question_streams_in_with_its_sources(browser, origin, rag_server, tmp_path):
    from selenium.webdriver.common.by import By

    question = "蟹堡王几点开门？"
    browser.get(origin)
    browser.execute_script("localStorage.removeItem('conch-lang')")
    answer = ask(browser, f"{origin}/?api={rag_server}&temperature=0&max_tokens=48", question, key=KEY)
    assert answer.get_attribute("data-state") == "done", answer.text
    assert labels(browser) == CHINESE  # Chinese first
    assert int(answer.get_attribute("data-pieces")) > 1  # streamed piece by piece, not in one block
    assert answer.find_element(By.CSS_SELECTOR, ".content").text.strip()
    sources = answer.find_elements(By.CSS_SELECTOR, ".sources li")
    assert sources and any("hours.md" in s.text for s in sources), [s.text for s in sources]
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == question
    # Chromium draws the page's Chinese with a CJK font (fonts-noto-cjk), not as boxes, in the screenshot too
    font = subprocess.run(["fc-match", "sans-serif:lang=zh-cn"], capture_output=True, text=True).stdout
    assert "CJK" in font, f"no Chinese font ({font.strip()}): apt-get install fonts-noto-cjk (make examples)"
    shot = Path(os.environ.get("CONCH_VUE_SCREENSHOT") or tmp_path / "vue_chat.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))


def test_a_wrong_key_and_a_stopped_answer_are_told_in_one_sentence(browser, origin, rag_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    answer = ask(browser, f"{origin}/?api={rag_server}", "你是谁？", key="wrong")
    assert answer.get_attribute("data-state") == "error"
    error = answer.find_element(By.CSS_SELECTOR, ".error").text
    assert error.startswith("API 密钥（API key）缺失或错误"), error
    assert error.endswith("（服务器：missing or wrong API key; send the header 'Authorization: Bearer <key>'.）"), error

    # English one click away, remembered after a reload; the server's sentence stays as the server sent it
    browser.find_element(By.ID, "lang").click()
    assert labels(browser) == ENGLISH
    answer = ask(browser, f"{origin}/?api={rag_server}", "Who are you?", key="wrong")
    assert labels(browser) == ENGLISH
    error = answer.find_element(By.CSS_SELECTOR, ".error").text
    assert error.startswith("API key missing or wrong"), error
    browser.find_element(By.ID, "lang").click()
    assert labels(browser) == CHINESE

    browser.get(f"{origin}/?api={rag_server}&temperature=0&max_tokens=400")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.ID, "question"))
    browser.find_element(By.ID, "api-key").clear()
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.ID, "question").send_keys("Count from 1 to 300, separated by commas.")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 120).until(
        lambda b: int(b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-pieces") or 0) > 2)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state='stopped']"))
    stopped = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    assert "已停止" in stopped.find_element(By.CSS_SELECTOR, ".stopped").text
    assert stopped.find_element(By.CSS_SELECTOR, ".content").text.strip()  # what came before the stop stays
    assert browser.find_element(By.ID, "send")  # ready for the next question


def test_the_reasoning_of_an_r1_model_is_folded(browser, origin, tiny_r1):
    from selenium.webdriver.common.by import By

    with conch(tiny_r1, origin) as server:
        answer = ask(browser, f"{origin}/?api={server.url}&temperature=0&max_tokens=12", "你是谁？")
    assert answer.get_attribute("data-state") == "done"
    fold = answer.find_element(By.CSS_SELECTOR, "details.reasoning")
    assert fold.get_attribute("open") is None  # folded once the stream is over
    assert "思考过程" in fold.find_element(By.TAG_NAME, "summary").text
    fold.find_element(By.TAG_NAME, "summary").click()
    assert fold.find_element(By.CSS_SELECTOR, ".reasoning-text").text.strip()
    # the random tiny model spends all 12 tokens thinking: the page says why the answer is empty
    assert "max_tokens" in answer.find_element(By.CSS_SELECTOR, ".notice").text
