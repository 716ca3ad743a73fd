import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "conch", *args], capture_output=True, text=True, timeout=120)


def test_user_error_is_one_line_and_exit_2():
    result = run_cli("download", "--model", "/no/such/model/folder")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_chat_answers_one_question(demo_path):
    result = run_cli("chat", "--model", str(demo_path), "--question", "What is the capital of France?",
                     "--temperature", "0", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
