"""The seeds' Java callers (examples/java), compiled with javac and run against a live `conch serve`: the
RestTemplate one (ConchCli; Spring 4.3 here, the same source on Spring 6 / Boot 3) and the Apache HttpClient 5
one (ConchCli5), each through the same tests."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from conch.serve import BackgroundServer

JAVA_DIR = Path(__file__).resolve().parents[1] / "examples" / "java"
KEY = "krabby-patty-secret"
# Chinese, and every character the seeds' String.format("%s/generate?prompt=%s") breaks: & ? # + and a space
PROMPT = "蟹堡王的汉堡 & 薯条多少钱？a+b=c?#1"
# the jars examples/java/build.sh compiles against, and the Debian package that installs each
JARS = {"spring3-web": "libspring-web-java", "spring3-core": "libspring-web-java",
        "spring3-beans": "libspring-web-java", "spring3-context": "libspring-web-java",
        "commons-logging": "libcommons-logging-java", "jackson-databind": "libjackson2-databind-java",
        "jackson-core": "libjackson2-databind-java", "jackson-annotations": "libjackson2-databind-java",
        "httpclient5": "libhttpclient5-java", "httpcore5": "libhttpcore5-java", "httpcore5-h2": "libhttpcore5-java",
        "slf4j-api": "libslf4j-java", "slf4j-nop": "libslf4j-java"}
# each caller: its main class and where build.sh puts its classes and classpath
CALLERS = {"resttemplate": ("com.krustykrab.conch.ConchCli", JAVA_DIR / "build"),
           "httpclient5": ("com.krustykrab.conch.ConchCli5", JAVA_DIR / "build" / "httpclient5")}


def _missing():
    """One sentence naming what is missing and the command that installs it, or None."""
    debs = [] if shutil.which("java") and shutil.which("javac") else ["default-jdk-headless"]
    jars = [jar for jar in JARS if not Path(f"/usr/share/java/{jar}.jar").is_file()]
    debs += sorted({JARS[jar] for jar in jars})
    if not debs:
        return None
    what = " and ".join((["a JDK (java, javac)"] if "default-jdk-headless" in debs else [])
                        + ([f"{', '.join(jar + '.jar' for jar in jars)} in /usr/share/java"] if jars else []))
    return (f"the Java callers need {what}: install with `apt-get install -y {' '.join(debs)}` "
            "(or `make examples`), as root.")


_MISSING = _missing()
if _MISSING:
    # CI runs `make examples` first, so there a missing JDK or jar is a broken setup, not a choice
    if os.environ.get("CI"):
        pytest.fail("CI must run the Java caller tests: " + _MISSING, pytrace=False)
    pytest.skip(_MISSING, allow_module_level=True)


@pytest.fixture(scope="module")
def built():
    """examples/java/build.sh: javac with Debian's Spring 4.3, Jackson and HttpClient 5 jars, both callers."""
    done = subprocess.run([str(JAVA_DIR / "build.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout


@pytest.fixture(scope="module", params=list(CALLERS))
def caller(request, built):
    """(main class, classpath) of one caller: every test runs with each."""
    main, build = CALLERS[request.param]
    return main, f"{build / 'classes'}:{(build / 'classpath').read_text().strip()}"


def java(caller, url, command, *questions, **settings):
    """Run the caller's CLI (ConchCli or ConchCli5) with CONCH_* settings under LANG=C \
(UTF-8 must not depend on the locale): the
    questions go in on stdin as UTF-8, the last line out is its JSON summary."""
    env = {"PATH": os.environ["PATH"], "LANG": "C", "CONCH_BASE_URL": url, "CONCH_MAX_TOKENS": "24",
           "CONCH_TEMPERATURE": "0",
           **{f"CONCH_{k.upper()}": str(v) for k, v in settings.items()}}
    args = command.split() + ["-"]
    main, classpath = caller
    done = subprocess.run(["java", "-cp", classpath, main, *args], env=env,
                          input="\n".join(questions).encode("utf-8"), capture_output=True, timeout=300)
    out, err = done.stdout.decode("utf-8"), done.stderr.decode("utf-8")
    summary = json.loads(out.strip().splitlines()[-1]) if done.returncode == 0 else None
    return done.returncode, out, err, summary


@pytest.fixture(scope="module")
def busy_server(demo_path, tmp_path_factory):
    """The demo model behind an API key, one request at a time and one waiting place: easy to fill."""
    log = tmp_path_factory.mktemp("java") / "serve.log"
    with BackgroundServer(demo_path, "--api_key", KEY, "--max_batch_size", "1", "--max_queue", "1",
                          env={"CONCH_THREADS": os.environ.get("CONCH_THREADS", "1")}, log=log) as server:
        yield server.url, log


def test_generate_round_trips_a_chinese_prompt_with_ampersand_and_question_mark(caller, busy_server):
    url, _ = busy_server
    rc, _, err, got = java(caller, url, "generate", PROMPT, api_key=KEY)
    assert rc == 0, err
    # the same prompt, encoded by httpx: the same prompt tokens and the same greedy answer
    params = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 24}
    expected = httpx.get(url + "/generate", params=params, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=120).json()
    assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
    assert got["answer"] == expected["generated_text"] and got["answer"].strip()
    # ... and the seeds' unencoded URL loses everything after '&': the test would notice that mistake
    seeds = httpx.get(f"{url}/generate?temperature=0&max_new_tokens=24&prompt={PROMPT}",
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120).json()
    assert seeds["usage"]["prompt_tokens"] < got["usage"]["prompt_tokens"]


def test_chat_sends_the_history_and_streaming_matches(caller, busy_server):
    url, _ = busy_server
    rc, out, err, got = java(caller, url, "chat", "你是谁？", "请再说一遍。", api_key=KEY)
    assert rc == 0, err
    first, second = got["turns"]
    assert first["answer"].strip() and second["answer"].strip() and "海螺: " in out
    # the second request carried the system prompt, the first question and its answer
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]

    rc, out, err, streamed = java(caller, url, "stream", "What is the capital of France?", api_key=KEY)
    assert rc == 0, err
    assert streamed["content_pieces"] > 1 and streamed["answer"].strip() and streamed["answer"] in out
    assert streamed["finish_reason"] in ("stop", "length") and streamed["usage"]["completion_tokens"] > 0


def test_wrong_key_and_no_server_end_in_one_clear_sentence(caller, busy_server):
    url, _ = busy_server
    rc, _, err, _ = java(caller, url, "generate", "hi", api_key="wrong")
    assert rc == 2 and "HTTP 401" in err and "CONCH_API_KEY" in err and "Exception" not in err
    rc, _, err, _ = java(caller, url, "stream", "hi")
    assert rc == 2 and "HTTP 401" in err
    rc, _, err, _ = java(caller, "http://127.0.0.1:9", "generate", "hi")
    assert rc == 3 and "could not reach the Magic Conch server at http://127.0.0.1:9" in err


def test_a_503_burst_is_retried_after_retry_after(caller, busy_server):
    url, log = busy_server
    refused_before = log.read_text().count('HTTP/1.1" 503')
    # 6 users at once, room for 2: 4 are refused, and come back after Retry-After (2 s) until answered
    rc, _, err, got = java(caller, url, "burst 6", "Tell me about the sea.", api_key=KEY, max_tokens=8,
                           max_retries=30)
    assert rc == 0, err
    refused = log.read_text().count('HTTP/1.1" 503') - refused_before
    assert got["answered"] == 6 and not got["errors"], got
    assert got["retries"] > 0 and refused == got["retries"]  # every 503 the server sent was retried
    # without retries, the same burst leaves users with the server's sentence, not a stack trace
    rc, _, err, got = java(caller, url, "burst 6", "Tell me about the sea.", api_key=KEY, max_tokens=8,
                           max_retries=0)
    assert rc == 0, err
    assert got["answered"] < 6 and got["retries"] == 0
    assert all("HTTP 503" in e and "busy" in e for e in got["errors"])


def test_reasoning_that_uses_up_the_budget_is_explained(caller, tiny_r1):
    with BackgroundServer(tiny_r1, env={"CONCH_THREADS": os.environ.get("CONCH_THREADS", "1")}) as server:
        rc, _, err, got = java(caller, server.url, "generate", "你是谁？", max_tokens=12)
        assert rc == 0, err
        # the random tiny R1 model never closes </think> in 12 tokens: all of them went into the reasoning
        assert got["answer"] == "" and got["reasoning"] and got["finish_reason"] == "length"
        assert "raise max_tokens" in got["problem"] and "note: the answer is empty" in err
        rc, _, err, streamed = java(caller, server.url, "stream", "你是谁？", max_tokens=12)
        assert rc == 0, err
        assert streamed["reasoning_pieces"] > 0 and streamed["reasoning"] and streamed["answer"] == ""
        assert streamed["problem"] and "raise max_tokens" in streamed["problem"]
