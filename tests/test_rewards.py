"""longrl_jax.rl.rewards: the r1v rule reward on tricky responses, and the LLM judge against a
real local HTTP server that speaks the OpenAI chat-completions format."""

import http.server
import json
import threading
import time

import pytest

from longrl_jax.rl import rewards
from longrl_jax.rl.rewards import Judge, JudgeConfig, compute_score, score_batch

# ------------------------------------------------------------------------------- rule reward

GOOD = "<think>The cat enters at the start.</think><answer>B</answer>"


def score(response, gt="B", **kw):
    s = compute_score(response, gt, **kw)
    assert s["overall"] == pytest.approx(0.9 * s["accuracy"] + 0.1 * s["format"])
    return s["accuracy"], s["format"]


@pytest.mark.parametrize("response,want", [
    (GOOD, (1.0, 1.0)),
    ("<think>a</think>  \n <answer>B</answer>", (1.0, 1.0)),                # spaces between
    ("<think>line 1\nline 2\n</think>\n<answer>\nB\n</answer>", (1.0, 1.0)),  # multiline
    ("Sure! " + GOOD, (1.0, 0.0)),                                           # text before
    (GOOD + " Hope that helps.", (1.0, 0.0)),                                # text after
    ("<answer>B</answer>", (1.0, 0.0)),                                      # only answer tags
    ("<think>no answer tags</think> B", (0.0, 0.0)),                         # whole text graded
    ("B", (1.0, 0.0)),                                                       # bare, no tags
    ("  B \n", (1.0, 0.0)),
    ("The answer is B", (0.0, 0.0)),
    ("<think>x</think><answer>b</answer>", (1.0, 1.0)),                      # mathruler: no case
    ("<think>x</think><answer>(B)</answer>", (1.0, 1.0)),                    # parens dropped
    ("<think>x</think><answer>C</answer>", (0.0, 1.0)),
    ("<think>x</think><answer>A</answer><answer>B</answer>", (0.0, 1.0)),    # first group wins
    ("<think>x</think><answer></answer>", (0.0, 1.0)),
    ("<think>x<answer>B</answer>", (1.0, 0.0)),                              # unclosed think
])
def test_rule_reward_tricky_responses(response, want):
    assert score(response) == want


def test_option_letter_with_explanation_is_wrong_in_the_original():
    # the July 2025 r1v removes spaces -> "B.explanation"; it does not cut at ".", and
    # mathruler does not equate "B.explanation" with "B".
    old = dict(cut_at_period=False)
    assert score("<think>x</think><answer> B. explanation </answer>", **old) == (0.0, 1.0)
    assert score("<think>x</think><answer>B.</answer>", **old) == (0.0, 1.0)
    # the newest r1v (our default) cuts at the first "." and takes the letter
    assert score("<think>x</think><answer> B. explanation </answer>") == (1.0, 1.0)
    assert score("<think>x</think><answer>B.</answer>") == (1.0, 1.0)
    assert score("<think>x</think><answer>B. Argentina win 4-3</answer>") == (1.0, 1.0)


@pytest.mark.parametrize("given,gt,want", [
    ("3.0", "3", 1.0), ("3", "3.0", 1.0), ("3.5", "3.5", 1.0), ("3.5", "3", 0.0),
    ("1/2", "0.5", 1.0), ("0.5", "1/2", 1.0), ("\\frac{1}{2}", "0.5", 1.0),
    ("\\frac{1}{2}", "1/2", 1.0), ("2/4", "1/2", 0.0),   # unreduced fractions are wrong
    ("1,000", "1000", 1.0), ("12 cm", "12", 1.0),        # "12cm" after space removal
])
def test_numbers(given, gt, want):
    assert score(f"<think>x</think><answer>{given}</answer>", gt)[0] == want


def test_decimals_survive_the_cut():
    for cut in (False, True):
        assert score("<answer>3.5</answer>", "3.5", cut_at_period=cut)[0] == 1.0
        assert score("<answer>3.5</answer>", "3", cut_at_period=cut)[0] == 0.0
        assert score("<answer>.5</answer>", "1/2", cut_at_period=cut)[0] == 1.0
    assert score("<answer>3.5. Because</answer>", "3.5")[0] == 1.0
    assert score("<answer>3.5. Because</answer>", "3.5", cut_at_period=False)[0] == 0.0


@pytest.mark.parametrize("gt", ["B", " B ", "<answer>B</answer>", "<answer> B </answer>",
                                "<answer>\nB\n</answer>"])
def test_ground_truth_with_and_without_tags(gt):
    assert score(GOOD, gt) == (1.0, 1.0)


def test_free_text_is_a_space_and_case_insensitive_match():
    assert score("<think>x</think><answer>The red car</answer>", "the red car")[0] == 1.0
    assert score("<think>x</think><answer>A red car</answer>", "the red car")[0] == 0.0


def test_score_batch_rule_types():
    types = ["multiple choice", "multiple_choice", "numerical", "open_ended", "open-ended",
             None, "OCR"]
    gts = ["B", "C", "3", "the red car", "blue", "A", "STOP"]
    responses = [GOOD, "<answer>C</answer>", "<answer>3.0</answer>",
                 "<answer>The red car</answer>", "<answer>Blue</answer>", "A",
                 "<answer>stop</answer>"]
    got = score_batch(responses, gts, types)  # no judge: the rule for every type
    assert [s["accuracy"] for s in got] == [1.0] * 7
    assert [s["format"] for s in got] == [1.0] + [0.0] * 6
    with pytest.raises(ValueError):
        score_batch(responses, gts[:-1], types)


# ------------------------------------------------------------------------------- judge

class FakeOpenAI(http.server.ThreadingHTTPServer):
    """POST /v1/chat/completions. `mode` picks the behaviour; counts requests and concurrency."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, mode):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = mode
        self.requests = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        srv = self.server
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append({"path": self.path, "body": req,
                                 "auth": self.headers.get("Authorization")})
            n = len(srv.requests)
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        # The request counts as active until its reply is decided, not until it is sent: the
        # client may read the reply and start its next request before this thread resumes.
        try:
            prompt = req["messages"][0]["content"]
            model_answer = prompt.split("Model answer: ")[1].split("\n")[0]
            verdict = "  Yes, it matches." if "Paris" in model_answer else "No"
            if srv.mode == "slow":
                time.sleep(1.0)
            if srv.mode == "concurrency":
                time.sleep(0.1)
            if srv.mode == "malformed":
                reply = (200, b'{"choices": [ {"message": ')
            elif srv.mode == "no_choices":
                reply = (200, {"choices": []})
            elif srv.mode == "flaky" and n == 1:
                reply = (500, {"error": "overloaded"})
            elif srv.mode == "unauthorized":
                reply = (401, {"error": "bad key"})
            else:
                reply = (200, {"choices": [{"message": {"role": "assistant",
                                                        "content": verdict}}]})
        finally:
            with srv.lock:
                srv.active -= 1
        self._send(*reply)


@pytest.fixture
def server(request):
    srv = FakeOpenAI(request.param)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def judge_for(srv, **kw):
    kw = {"timeout_s": 0.2, "max_retries": 1, "backoff_s": 0.01, **kw}
    return Judge(JudgeConfig(url=srv.url, model="fake", api_key_env="LONGRL_TEST_JUDGE_KEY",
                             **kw))


@pytest.mark.parametrize("server", ["ok"], indirect=True)
def test_judge_yes_no(server, monkeypatch):
    monkeypatch.setenv("LONGRL_TEST_JUDGE_KEY", "sk-test")
    judge = judge_for(server)
    yes = judge.score("Capital of France?", "<think>hm</think><answer> Paris </answer>",
                      "<answer>Paris</answer>")
    assert yes == {"accuracy": 1.0, "format": 1.0, "overall": 1.0}
    whole = judge.score("Capital of France?", "I think it is Lyon, not Paris-adjacent", "Paris")
    # no <answer> tags: the whole response is judged (it contains "Paris" -> the fake says Yes)
    assert whole["accuracy"] == 1.0 and whole["format"] == 0.0
    no = judge.score("Capital of France?", "<answer>Lyon</answer>", "Paris")
    assert no == {"accuracy": 0.0, "format": 0.0, "overall": 0.0}
    assert judge.failures == 0
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "fake"
    assert "Model answer: Paris\n" in req["body"]["messages"][0]["content"]
    assert "Reference answer: Paris\n" in req["body"]["messages"][0]["content"]


@pytest.mark.parametrize("server", ["slow"], indirect=True)
def test_judge_timeout_is_scored_zero_and_counted(server):
    judge = judge_for(server)
    s = judge.score("q", "<answer>Paris</answer>", "Paris")
    # the fake answers Yes after 1 s: a 0 with a timeout means the 0.2 s limit cut both tries
    # (no wall-clock assertion: a loaded machine must not fail this)
    assert s["accuracy"] == 0.0 and "timeout" in s["judge_error"]
    assert judge.failures == 1 and len(server.requests) == 2


@pytest.mark.parametrize("server,reason", [("malformed", "malformed JSON"),
                                           ("no_choices", "no choices")], indirect=["server"])
def test_judge_bad_replies(server, reason):
    judge = judge_for(server)
    s = judge.score("q", "<think>t</think><answer>Paris</answer>", "Paris")
    assert s["accuracy"] == 0.0 and reason in s["judge_error"]
    assert s["format"] == 1.0 and s["overall"] == pytest.approx(0.1)
    assert judge.failures == 1 and len(server.requests) == 2  # retried once


@pytest.mark.parametrize("server", ["flaky"], indirect=True)
def test_judge_retries_after_http_500(server):
    judge = judge_for(server)
    assert judge.score("q", "<answer>Paris</answer>", "Paris")["accuracy"] == 1.0
    assert judge.failures == 0 and len(server.requests) == 2


@pytest.mark.parametrize("server", ["unauthorized"], indirect=True)
def test_judge_does_not_retry_client_errors(server, monkeypatch):
    monkeypatch.delenv("LONGRL_TEST_JUDGE_KEY", raising=False)
    judge = judge_for(server, max_retries=3)
    s = judge.score("q", "<answer>Paris</answer>", "Paris")
    assert "HTTP 401" in s["judge_error"] and len(server.requests) == 1
    assert server.requests[0]["auth"] is None


@pytest.mark.parametrize("server", ["concurrency"], indirect=True)
def test_judge_concurrency_bound_and_order(server):
    judge = judge_for(server, max_concurrency=3, timeout_s=5.0)
    items = [("q", f"<answer>{'Paris' if i % 2 else 'Rome'}</answer>", "Paris")
             for i in range(12)]
    # two callers at once share the same bound
    results = {}
    threads = [threading.Thread(target=lambda k=k: results.update({k: judge.score_many(items)}))
               for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        assert [s["accuracy"] for s in results[k]] == [float(i % 2) for i in range(12)]
    assert server.max_active == 3 and len(server.requests) == 24


def test_judge_unreachable_never_raises():
    with FakeOpenAI("ok") as srv:
        url = srv.url  # bound, then closed: nothing listens there
    judge = Judge(JudgeConfig(url=url, timeout_s=0.2, max_retries=1, backoff_s=0.01))
    got = judge.score_many([{"question": "q", "response": "<answer>x</answer>",
                             "reference": "x"}] * 3)
    assert [s["accuracy"] for s in got] == [0.0] * 3
    assert all("connection" in s["judge_error"] for s in got) and judge.failures == 3


@pytest.mark.parametrize("server", ["ok"], indirect=True)
def test_score_batch_routes_open_ended_to_the_judge(server):
    judge = judge_for(server)
    responses = ["<answer>Paris</answer>", "<answer>the city of Paris</answer>",
                 "<answer>B</answer>", "<answer>Lyon</answer>"]
    got = score_batch(responses, ["Paris", "Paris", "B", "Paris"],
                      ["open-ended", "open_ended", "multiple choice", "free-form"],
                      judge=judge, questions=["q1", "q2", "q3", "q4"])
    assert [s["accuracy"] for s in got] == [1.0, 1.0, 1.0, 0.0]
    # the rule alone would have failed "the city of Paris"
    assert compute_score(responses[1], "Paris")["accuracy"] == 0.0
    assert len(server.requests) == 3  # the multiple-choice row never reached the judge
    prompts = [r["body"]["messages"][0]["content"] for r in server.requests]
    assert sorted(p.split("Question: ")[1].split("\n")[0] for p in prompts) == ["q1", "q2", "q4"]


def test_judge_config_checks_and_endpoint():
    assert JudgeConfig(url="http://h:1/").endpoint == "http://h:1/v1/chat/completions"
    assert JudgeConfig(url="http://h:1/v1").endpoint == "http://h:1/v1/chat/completions"
    assert JudgeConfig(url="http://h/v1/chat/completions").endpoint == \
        "http://h/v1/chat/completions"
    with pytest.raises(KeyError):
        JudgeConfig(url="http://h", prompt_template="{answer}")
    with pytest.raises(ValueError):
        JudgeConfig(url="http://h", max_concurrency=0)
    assert rewards.normalize_problem_type(" Open-Ended ") == "open ended"
