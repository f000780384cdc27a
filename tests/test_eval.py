"""eval.py: benchmark parsing, grading, the results table and files, mean@k, the general-domain benchmarks
(kinds, the authors' prompts, BBEH's matching, GENERAL AVG), user errors. Tiny model, CPU."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import eval as ev
import engine
import sample
import toy
from conftest import CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE, byte_level_tokenizer, make_hf_model, make_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.environ.get("RZERO_BENCHMARKS")  # a folder of the real benchmark files (README), read when given

MIXED = [  # one row per field convention
    ({"problem": "what is 1 / 2 ?", "answer": "\\frac{1}{2}"}, "\\frac{1}{2}"),
    ({"question": "p2", "answer": "She pays 2 * 900 = 1800.\n#### 1,800"}, "1800"),
    ({"question": "p3", "final_answer": ["$3$, $5$"]}, "$3$, $5$"),
    ({"problem": "p4", "solution": "so it is $\\boxed{\\sqrt{2}}$."}, "\\sqrt{2}"),
    ({"problem": "p5", "answer": 27.0}, "27.0"),
]
MC = [
    {"question": "q1", "options": ["x", "y", "z"], "answer": "B"},
    {"question": "q2", "choices": ["x", "y", "z"], "answer_index": 2},
    {"question": "q3", "options": ["x", "y", "z"], "answer": "y"},  # SuperGPQA: the option text
    {"question": "q4", "options": ["x", "y", "z"], "answer_letter": "A"},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = [str(root / name / "solver") for name in "ab"]  # same last folder: names become a/solver, b/solver
    make_hf_model(paths[0], "qwen3", vocab=len(make_tokenizer(paths[0])))
    shutil.copytree(paths[0], paths[1])
    return paths


@pytest.fixture
def scripted(monkeypatch):
    """Replaces engine.generate: each call returns the next scripted [problem][sample] responses."""
    script, calls = [], []

    def fake(model, prompts, n=1, temperature=1.0, tokenizer=None, **kw):
        calls.append(dict(n=n, temperature=temperature, n_prompts=len(prompts), prompts=prompts, **kw))
        responses = script.pop(0)
        assert len(responses) == len(prompts) and all(len(r) == n for r in responses)
        return [[sample.Completion([], [], "eos", t) for t in r] for r in responses]

    monkeypatch.setattr(engine, "generate", fake)
    return script, calls


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f] if path.endswith(".jsonl") else f.read()


def test_table_and_per_problem_files(tmp_path, models, scripted):
    script, calls = scripted
    mixed = write_jsonl(tmp_path / "mixed.test.jsonl", [r for r, _ in MIXED])
    mc = write_jsonl(tmp_path / "mc.jsonl", MC)
    p = toy.heldout_problems(5)  # --limit 5 applies to the toy set too
    # model a: mixed 3/5 (0.5 = 1/2, 1800, {5, 3}; wrong sqrt; no box), mc 2/4, toy 2/5
    script += [[["so \\boxed{0.5}"], ["\\boxed{1800}"], ["\\boxed{5, 3}"], ["\\boxed{2}"], ["27"]],
               [["\\boxed{B}"], ["\\boxed{(C)}"], ["\\boxed{\\text{A}}"], ["I think A"]],
               [[toy.worked_solution(p[0])], [f"\\boxed{{{toy.solve(p[1])}}}"]] + [["\\boxed{0}"]] * 3]
    # model b: mixed 1/5, mc 4/4, toy 0/5
    script += [[["\\boxed{1/2}"], ["\\boxed{18}"], ["\\boxed{3}"], ["x"], ["\\boxed{26}"]],
               [["\\boxed{B. y}"], ["\\boxed{C}"], ["\\boxed{(B)}"], ["\\boxed{\\text{(A)}}"]],
               [["x"]] * 5]
    out = str(tmp_path / "out")
    ev.main(["--model", *models, "--data", mixed, mc, "toy", "--limit", "5", "--out", out])
    assert [c["n"] for c in calls] == [1] * 6 and {c["temperature"] for c in calls} == {0.0}  # greedy pass@1
    assert [c["n_prompts"] for c in calls] == [5, 4, 5] * 2  # one batched call per (model, benchmark)
    res = json.loads(read(os.path.join(out, "results.json")))["results"]
    assert res["a/solver"]["mixed"] == dict(score=60.0, n=5, k=1, no_answer=1)
    assert res["a/solver"]["mc"] == dict(score=50.0, n=4, k=1, no_answer=1)
    assert res["a/solver"]["toy"] == dict(score=40.0, n=5, k=1, no_answer=0)
    assert res["a/solver"]["MATH AVG"] == pytest.approx(50.0)  # mixed and toy; multiple choice is not math
    assert res["b/solver"]["MATH AVG"] == pytest.approx(10.0) and res["b/solver"]["GENERAL AVG"] == 100.0
    md = read(os.path.join(out, "results.md")).splitlines()
    assert md[0] == "| model | mixed | mc | toy | MATH AVG | GENERAL AVG |"
    assert md[2:4] == ["| a/solver | 60.00 | 50.00 | 40.00 | 50.00 | 50.00 |",
                       "| b/solver | 20.00 | 100.00 | 0.00 | 10.00 | 100.00 |"]
    assert "| a/solver | 1/5 | 1/4 | 0/5 |" in md
    rows = read(os.path.join(out, "a_solver", "mixed.jsonl"))
    assert [r["reference"] for r in rows] == [ref for _, ref in MIXED]
    assert [r["answers"] for r in rows] == [["0.5"], ["1800"], ["5, 3"], ["2"], [None]]
    assert [r["correct"] for r in rows] == [[True], [True], [True], [False], [False]]
    assert rows[0]["responses"] == ["so \\boxed{0.5}"] and "user what is 1 / 2 ?" in rows[0]["prompt"]
    mc_rows = read(os.path.join(out, "a_solver", "mc.jsonl"))
    assert [r["reference"] for r in mc_rows] == ["B", "C", "B", "A"]
    assert [r["answers"][0] for r in mc_rows] == ["B", "C", "A", None]
    assert read(os.path.join(out, "a_solver", "toy.jsonl"))[0]["reference"] == str(toy.solve(p[0]))


def test_choice_extractor():
    cases = {"\\boxed{B}": "B", "\\boxed{(B)}": "B", "\\boxed{\\text{B}}": "B", "\\boxed{B. 42}": "B",
             "so $\\boxed{\\textbf{(D)}}$": "D", "\\boxed{c}": "C", "\\boxed{42}": None, "The answer is B.": None,
             "\\boxed{}": None, "\\boxed{Because}": None}
    assert {t: ev.extract_choice(t) for t in cases} == cases


def test_field_overrides_and_errors(tmp_path):
    cfg = ev.EvalConfig(question_field="prompt", answer_field="target")
    path = write_jsonl(tmp_path / "bbh.jsonl", [{"prompt": "2+2?", "target": 4, "answer": "5"}])
    b = ev.load_benchmark(path, cfg)
    assert (b.name, b.kind, b.questions, b.references) == ("bbh", "math", ["2+2?"], ["4"])
    b = ev.load_benchmark(write_jsonl(tmp_path / "mc.jsonl", MC), ev.EvalConfig())
    assert b.kind == "choice"
    assert b.questions[0] == "q1\nOptions are:\n(A): x\n(B): y\n(C): z\n\n\n" + ev.CHOICE_INSTRUCTION  # authors' form
    with pytest.raises(ValueError, match="no answer field"):
        ev.load_benchmark(write_jsonl(tmp_path / "x.jsonl", [{"problem": "p", "solution": None}]), ev.EvalConfig())
    with pytest.raises(ValueError, match="reference"):  # a worked solution without a boxed answer
        ev.load_benchmark(write_jsonl(tmp_path / "y.jsonl", [{"problem": "p", "solution": "no box"}]), ev.EvalConfig())


def test_mean_at_k_is_a_mean_over_samples(tmp_path, models, scripted):
    script, calls = scripted
    amc = write_jsonl(tmp_path / "amc.jsonl", [{"problem": "what", "answer": "1"}, {"problem": "q", "answer": 2}])
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "r", "answer": "#### 3"}])
    script += [[["\\boxed{1}", "\\boxed{2}", "\\boxed{1.0}", "none"], ["\\boxed{2}"] * 4], [["\\boxed{3}"]]]
    out = str(tmp_path / "out")
    ev.main(["--model", models[0], "--data", amc, gsm, "--k", "4", "--k-only", "amc", "--raw-prompt", "--out", out])
    assert [(c["n"], c["temperature"], c["top_p"]) for c in calls] == [(4, 0.6, 0.95), (1, 0.0, 1.0)]
    assert calls[0]["stop_strings"] == (ev.RAW_STOP,)
    res = json.loads(read(os.path.join(out, "results.json")))["results"]["solver"]
    assert res["amc"] == dict(score=75.0, n=2, k=4, no_answer=1)  # (2/4 + 4/4) / 2
    assert res["gsm"]["score"] == 100.0 and res["MATH AVG"] == pytest.approx(87.5)
    assert read(os.path.join(out, "results.md")).splitlines()[0] == "| model | amc (mean@4) | gsm | MATH AVG |"
    rows = read(os.path.join(out, "solver", "amc.jsonl"))
    assert rows[0]["correct"] == [True, False, True, False] and rows[0]["score"] == 0.5
    assert rows[0]["prompt"] == ("<unk> : what <unk> reason step by step , <unk> put <unk> final answer within \\ "
                                 "boxed { } . <unk> :")  # "Question: what\n{SOLVER_SYSTEM}\nAnswer:", no template


def test_real_sampling_gives_different_samples(tmp_path, models):
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "what is 1 + 2 ?", "answer": "3"},
                                              {"problem": "hello world", "answer": "4"}])
    out = str(tmp_path / "out")
    ev.main(["--model", models[0], "--data", data, "--k", "4", "--temperature", "1.0", "--max-new-tokens", "6",
             "--out", out])
    for row in read(os.path.join(out, "solver", "d.jsonl")):
        assert len(row["responses"]) == 4 and len(set(row["responses"])) > 1  # not a repeated greedy answer


def test_bad_inputs_exit_2_and_keep_old_results(tmp_path, models, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("earlier\n")
    good = write_jsonl(tmp_path / "good.jsonl", [{"problem": "p", "answer": "1"}])
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "p", "answer": "1"}])
    cases = [["--model", models[0], "--data", str(tmp_path / "bad.jsonl")],
             ["--model", models[0], "--data", str(tmp_path / "empty.jsonl")],
             ["--model", models[0], "--data", nofield],
             ["--model", models[0], "--data", str(tmp_path / "missing.jsonl")],
             ["--model", models[0], "--data", good, "--k", "0"]]
    for argv in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(argv + ["--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)
    # as a real process: a missing model folder
    p = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "--model", str(tmp_path / "nope"),
                        "--data", good, "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [f"error: model folder {str(tmp_path / 'nope')!r} "
                                                                    "does not exist"]
    assert (out / "results.md").read_text() == "earlier\n" and sorted(os.listdir(out)) == ["results.md"]


@pytest.mark.parametrize("breaks, named", [
    (lambda m: os.truncate(os.path.join(m, "model.safetensors"), 1024), "model.safetensors"),
    (lambda m: os.remove(os.path.join(m, "config.json")), "config.json"),
])
def test_every_model_folder_is_checked_before_any_work(tmp_path, models, capsys, monkeypatch, breaks, named):
    """A broken second model is found before the first one answers anything (model.check_folder)."""
    broken = str(tmp_path / "c" / "solver")
    shutil.copytree(models[0], broken)
    breaks(broken)
    calls = []
    monkeypatch.setattr(engine, "generate", lambda *a, **k: calls.append(1) or [])
    good = write_jsonl(tmp_path / "good.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", models[0], broken, "--data", good, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert calls == [] and not (tmp_path / "out").exists()


# The authors' instructions (evaluation/eval_mmlupro.py, eval_supergpqa.py, eval_bbeh.py), written out here
AUTHORS_BBEH = "Please reason step by step, and put your final answer option within \\boxed{}."
AUTHORS_MC = AUTHORS_BBEH + " Only put the option letter in the box, e.g. \\boxed{A}. There is only one correct answer."
AUTHORS_SUPERGPQA = AUTHORS_MC.replace("option letter", "letter")
BBEH = [  # row, response, extracted answer, correct
    ({"question": "Which?", "answer": "a", "task": "t1"}, "so \\boxed{(A)}", "(a)", True),
    ({"question": "n?", "answer": "3", "task": "t2"}, "\\boxed{3.0}", "3.0", True),
    ({"question": "l?", "answer": "x", "task": "t2"}, "\\boxed{[x]}", "[x]", True),
    ({"question": "y?", "answer": "Yes", "task": "t3"}, "\\boxed{no}", "no", False),
    ({"question": "tf?", "answer": "True, False", "task": "t3"}, "The answer is: **True, False**.", "true,false", True),
    ({"question": "c?", "answer": "(B)", "task": "t1"}, "I cannot tell", None, False),
]
MMLU_PRO = [{"question": "What is 2+2?", "options": ["1", "2", "4", "8"], "answer": "C", "answer_index": 2,
             "category": "math"},
            {"question": "Capital of France?", "options": ["Rome", "Paris"], "answer": "B", "answer_index": 1,
             "category": "other"}]


def test_general_benchmarks_have_their_own_average(tmp_path, models, scripted):
    """BBEH and MMLU-Pro beside a math set: neither enters MATH AVG; GENERAL AVG is their mean; 8192 tokens."""
    from transformers import AutoTokenizer

    script, calls = scripted
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "r", "answer": "#### 3"},
                                               {"question": "s", "answer": "#### 4"}])
    bbeh = write_jsonl(tmp_path / "bbeh.jsonl", [row for row, *_ in BBEH])
    mmlu = write_jsonl(tmp_path / "mmlu_pro.jsonl", MMLU_PRO)
    script += [[["\\boxed{3}"], ["\\boxed{5}"]], [[r] for _, r, *_ in BBEH], [["\\boxed{C}"], ["\\boxed{A}"]]]
    out = str(tmp_path / "out")
    ev.main(["--model", models[0], "--data", gsm, bbeh, mmlu, "--out", out])
    assert [c["max_new_tokens"] for c in calls] == [4096, 8192, 8192] and {c["n"] for c in calls} == {1}
    res = json.loads(read(os.path.join(out, "results.json")))["results"]["solver"]
    assert res["bbeh"] == dict(score=pytest.approx(400 / 6), n=6, k=1, no_answer=1)
    assert res["mmlu_pro"]["score"] == 50.0 and res["gsm"]["score"] == 50.0
    assert res["MATH AVG"] == 50.0  # gsm alone
    assert res["GENERAL AVG"] == pytest.approx((400 / 6 + 50.0) / 2)
    md = read(os.path.join(out, "results.md")).splitlines()
    assert md[0] == "| model | gsm | bbeh | mmlu_pro | MATH AVG | GENERAL AVG |"
    assert md[2] == "| solver | 50.00 | 66.67 | 50.00 | 50.00 | 58.33 |"
    assert "| solver | 0/2 | 1/6 | 0/2 |" in md
    rows = read(os.path.join(out, "solver", "bbeh.jsonl"))
    assert [r["answers"][0] for r in rows] == [a for *_, a, _ in BBEH]
    assert [r["correct"][0] for r in rows] == [c for *_, c in BBEH]
    # what the model was given: the user turn alone, through the checkpoint's chat template
    tok = AutoTokenizer.from_pretrained(models[0])
    turn = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    mc = "What is 2+2?\nOptions are:\n(A): 1\n(B): 2\n(C): 4\n(D): 8\n\n\n" + AUTHORS_MC
    assert calls[2]["prompts"][0] == tok.encode(turn.format(mc), add_special_tokens=False)
    assert calls[1]["prompts"][0] == tok.encode(turn.format("Which?\n\n" + AUTHORS_BBEH), add_special_tokens=False)
    assert "system" not in tok.decode(calls[1]["prompts"][0]) and "system" in tok.decode(calls[0]["prompts"][0])


def test_general_prompts_are_the_authors_character_for_character(tmp_path):
    mmlu = ev.load_benchmark(write_jsonl(tmp_path / "mmlu_pro.test.jsonl", MMLU_PRO), ev.EvalConfig())
    sgpqa = ev.load_benchmark(write_jsonl(tmp_path / "SuperGPQA.jsonl", [
        {"question": "Pick", "options": ["u", "v"], "answer": "v", "answer_letter": "B"}]), ev.EvalConfig())
    bbeh = ev.load_benchmark(write_jsonl(tmp_path / "bbeh.jsonl", [row for row, *_ in BBEH]), ev.EvalConfig())
    assert (mmlu.kind, sgpqa.kind, bbeh.kind) == ("choice", "choice", "bbeh")
    authors = [(mmlu, "What is 2+2?\nOptions are:\n(A): 1\n(B): 2\n(C): 4\n(D): 8\n\n\n" + AUTHORS_MC),
               (sgpqa, "Pick\nOptions are:\n(A): u\n(B): v\n\n\n" + AUTHORS_SUPERGPQA),
               (bbeh, "Which?\n\n" + AUTHORS_BBEH)]
    templated, plain = byte_level_tokenizer(CHAT_TEMPLATE), byte_level_tokenizer()
    with open(QWEN3_CHAT_TEMPLATE) as f:  # Qwen3's own
        qwen3 = byte_level_tokenizer(f.read())
    for b, text in authors:
        for tok in (templated, qwen3):
            assert tok.decode(ev.prompt_ids(tok, b.kind, b.questions[0])) == (
                f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"), b.name
        assert plain.decode(ev.prompt_ids(plain, b.kind, b.questions[0])) == "user: " + text  # no template
        assert templated.decode(ev.prompt_ids(templated, b.kind, b.questions[0], raw=True)) == "user: " + text
    assert templated.decode(ev.prompt_ids(templated, "math", "p")).startswith("<|im_start|>system\n")  # Solver's


def test_kind_detection(tmp_path):
    kinds = {"free": [{"question": "q", "answer": "a", "task": "t"}],  # BBEH's fields
             "bbeh_mini": [{"question": "q", "answer": "a"}],  # BBEH's name
             "bbeh_mc": [{"question": "q", "options": ["a", "b"], "answer": "A"}],  # options decide
             "plain": [{"question": "q", "answer": "a"}]}
    got = {n: ev.load_benchmark(write_jsonl(tmp_path / f"{n}.jsonl", rows), ev.EvalConfig()).kind
           for n, rows in kinds.items()}
    assert got == dict(free="bbeh", bbeh_mini="bbeh", bbeh_mc="choice", plain="math")


def test_bbeh_matching():
    """eval_bbeh.py's extraction and fuzzy match, case by case."""
    cases = [("\\boxed{(A)}", "a", True), ("\\boxed{a}", "(A)", True), ("\\boxed{(A)}", "b", False),
             ("\\boxed{3.0}", "3", True), ("\\boxed{[x]}", "x", True), ("\\boxed{x}", "[x]", True),
             ("\\boxed{'x'}", "x", True), ("\\boxed{Yes?}", "yes", True), ("\\boxed{\\text{Dog}}.", "dog", True),
             ("\\boxed{$12$}", "12", True), ("\\boxed{A, B}", "a,b", True), ("\\boxed{a,b}", "A, B", True),
             ("Final Answer: 5\nThe answer is: 6\n", "5", True), ("The answer is: 7", "7", True),
             ("\\boxed{dog}", "cat", False), ("\\boxed{3.5}", "3", False), ("no answer", "x", False)]
    assert [ev.grade("bbeh", r, ref)[1] for r, ref, _ in cases] == [ok for *_, ok in cases]
    assert ev.grade("bbeh", "no answer", "x") == (None, False)
    assert ev.extract_free("\\boxed{\\text{Dog}}.") == "dog" and ev.extract_free("The answer is: **No**.") == "no"


@pytest.mark.skipif(BENCH is None, reason="RZERO_BENCHMARKS names no folder of benchmark files")
def test_real_benchmarks(tmp_path, models):
    refs = {}
    for f in sorted(os.listdir(BENCH)):
        if f.endswith(".jsonl"):
            b = ev.load_benchmark(os.path.join(BENCH, f), ev.EvalConfig())
            assert b.kind == "math" and all(b.questions) and all(b.references), f
            refs[b.name] = b.references
    assert refs["gsm8k"][0] == "18" and refs["amc23"][0] == "27.0" and refs["minerva_math"][0] == "1.6"
    assert len(refs["gsm8k"]) == 1319 and len(refs["olympiadbench"]) == 675
    out = str(tmp_path / "out")
    ev.main(["--model", *models, "--data", os.path.join(BENCH, "amc23.test.jsonl"), "--limit", "5",
             "--max-new-tokens", "8", "--out", out])
    md = read(os.path.join(out, "results.md")).splitlines()
    assert md[0] == "| model | amc23 | MATH AVG |"
    assert md[2].startswith("| a/solver |") and md[3].startswith("| b/solver |")
    assert len(read(os.path.join(out, "b_solver", "amc23.jsonl"))) == 5
