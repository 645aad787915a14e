import io
import time

from catdog.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_short_lines_not_carriage_returns(monkeypatch):
    monkeypatch.setenv("CATDOG_PROGRESS_SECONDS", "0.05")
    log = io.StringIO()
    for _ in progress_bar(range(20), desc="extract", unit="img", file=log):
        time.sleep(0.01)
    with progress_bar(total=3, desc="quick", file=log) as bar:
        bar.update(3)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and 3 <= len(lines) <= 21
    assert all(len(line) <= 100 for line in lines)
    assert lines[-1].startswith("extract: 100%") and "20/20" in lines[-1]
    assert "quick" not in text  # done within one interval: nothing to report


def test_a_terminal_gets_tqdm_as_it_is():
    screen = Terminal()
    for _ in progress_bar(range(5), desc="train", file=screen, mininterval=0):
        pass
    assert "\r" in screen.getvalue() and "5/5" in screen.getvalue()
