"""The toy world: its checker against hand-worked cases, its corpus against the method's parsers, and a build at
test size that loads like any Hugging Face checkpoint."""
import os

import pytest
import torch

import challenger
import grader
import solver
import toy
from runtime import TOY_WORLD

TINY = toy.ToyConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, steps=3, batch_size=4, seq_len=64, warmup=1)

SOLVE = [  # problem -> ground truth (None: not a toy problem)
    ("What is 47 + 38?", 85),
    ("What is 52 + 379 * 4?", 1568),
    ("what is 379*4+52 ?", 1568),
    ("52+379*4", 1568),
    ("What is 3 * 4 * 5?", 60),
    ("What is 0 * 9 + 7?", 7),
    ("What is 7?", 7),
    ("What is 83 * 7 + 406 * 9?", 4235),
    ("", None),
    ("What is ?", None),
    ("What is 4 / 2?", None),
    ("What is 2 ** 3?", None),
    ("What is (1 + 2) * 3?", None),
    ("What is 4 - 2?", None),
    ("What is 012 + 3?", None),
    ("What is 1234567 + 1?", None),  # numbers are bounded so the checker is always fast
    ("What is 1+1+1+1+1+1+1+1+1?", None),
    ("What is 1e9 * 2?", None),
    ("What is 12 + 34? Also 5 + 6?", None),
    ("<question>What is 1 + 2?</question>", None),
    ("x" * 10_000, None),
]


@pytest.mark.parametrize("problem,truth", SOLVE)
def test_solve(problem, truth):
    assert toy.solve(problem) == truth


def test_solve_rejects_non_strings():
    assert toy.solve(None) is None and toy.difficulty(None) is None and not toy.check_answer(None, "1")


@pytest.mark.parametrize("answer,ok", [
    ("85", True), (" 85 ", True), ("+85", True), ("85.0", True),
    ("47+38=\\boxed{85}", True), ("\\boxed{84} no, \\boxed{85}", True), ("\\boxed{85} no, \\boxed{84}", False),
    ("84", False), ("eighty-five", False), ("", False), ("\\boxed{", False), ("\\boxed{}", False),
    ("85/1", False), ("8" * 40, False), (None, False),
])
def test_check_answer(answer, ok):
    assert toy.check_answer("What is 47 + 38?", answer) is ok


def test_worked_solutions_and_difficulty():
    assert toy.worked_solution("What is 47 + 38?") == "47+38=85 \\boxed{85}"
    assert toy.worked_solution("What is 52 + 379 * 4?") == (
        "300*4=1200 70*4=280 9*4=36 1200+0280=1480 1480+0036=1516 0052+1516=1568 \\boxed{1568}")
    assert toy.worked_solution("What is 4 * 307?") == "300*4=1200 7*4=28 1200+0028=1228 \\boxed{1228}"
    assert toy.worked_solution("What is 7?") == "\\boxed{7}"
    assert [toy.difficulty(p) for p in ["What is 7?", "What is 47 + 38?", "What is 47 * 6?",
                                        "What is 52 + 47 * 6?", "What is 379 * 4?", "What is 512 + 379 * 4?",
                                        "What is 47 * 6 + 83 * 7?", "What is 379 * 4 + 83 * 7?"]] == [
        0, 1, 3, 4, 5, 6, 7, 9]
    assert toy.difficulty("What is 4 / 2?") is None
    for level in toy.LEVELS:  # every worked chain is right
        import random
        rng = random.Random(level)
        for _ in range(50):
            p = toy.sample_problem(level, rng)
            assert toy.check_answer(p, toy.worked_solution(p))


def test_heldout_problems():
    probs = toy.heldout_problems(70, seed=3)
    assert probs == toy.heldout_problems(70, seed=3) and probs != toy.heldout_problems(70, seed=4)
    assert len(set(probs)) == 70 and all(toy.is_heldout(p) for p in probs)
    assert {toy.difficulty(p) for p in probs} >= {3, 5, 7, 9}  # every level (a zero digit skips a step)
    assert len(toy.heldout_problems(512)) == 512  # the size train.py measures
    assert toy.is_heldout("What is 52+379*4?") == toy.is_heldout("What is 52 + 379 * 4?")


@pytest.fixture(scope="module")
def tiny_toy(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("toy") / "world")
    stats = toy.build_toy(path, TINY, log_every=0)
    return path, stats


def test_build_loads_like_a_checkpoint(tiny_toy):
    from transformers import AutoConfig, AutoTokenizer

    from model import Transformer

    path, stats = tiny_toy
    assert {"config.json", "model.safetensors", "tokenizer.json", "toy.json"} <= set(os.listdir(path))
    assert not os.path.exists(path + ".tmp")  # written through one temporary folder, renamed whole
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.decode(tok.encode("12+345=\\boxed{357}")) == "12+345=\\boxed{357}"
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]  # digits are always split
    pieces = tok.convert_ids_to_tokens(solver.solver_prompt(tok, "What is 47 * 6?"))
    assert len(pieces) == 22 and solver.SOLVER_SYSTEM in pieces and "What is " in pieces  # fixed texts: 1 token
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert AutoConfig.from_pretrained(path).model_type == "qwen3"
    model = Transformer.from_pretrained(path)
    assert model.config.vocab_size == len(tok) and model.config.tie_word_embeddings
    assert model.num_params() == stats["params"]
    logits = model(torch.tensor([challenger.challenger_prompt(tok)]))
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_build_is_deterministic(tiny_toy, tmp_path):
    from safetensors.torch import load_file

    path, _ = tiny_toy
    toy.build_toy(str(tmp_path / "again"), TINY, log_every=0)
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(path, "tokenizer.json")) as f, open(tmp_path / "again" / "tokenizer.json") as g:
        assert f.read() == g.read()


def test_corpus_documents_parse_with_the_method_parsers(tiny_toy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_toy[0])
    corpus = toy.Corpus(tok, TINY)
    chal = challenger.challenger_prompt(tok)
    for _ in range(40):
        doc = corpus.document("challenger")
        assert doc[:len(chal)] == chal and doc[-1] == tok.eos_token_id
        q = challenger.parse_question(tok.decode(doc[len(chal):], skip_special_tokens=True))
        assert toy.solve(q) is not None and not toy.is_heldout(q)
        assert challenger.parse_challenger_answer(tok.decode(doc[len(chal):])) == str(toy.solve(q))
    for _ in range(40):
        doc = corpus.document("solver")
        text = tok.decode(doc)
        problem = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        prompt = solver.solver_prompt(tok, problem)
        assert doc[:len(prompt)] == prompt and doc[-1] == tok.eos_token_id and not toy.is_heldout(problem)
        answer = tok.decode(doc[len(prompt):], skip_special_tokens=True)
        assert grader.is_equiv(grader.extract_boxed(answer), str(toy.solve(problem)))


def test_batches_pack_the_document_stream(tiny_toy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_toy[0])
    stream, batches = toy.Corpus(tok, TINY), toy.Corpus(tok, TINY).batches(3, 50)
    xs = [next(batches) for _ in range(3)]
    docs = []  # the same documents drawn one by one: the batches are consecutive cuts of their concatenation
    while len(docs) < 3 * 3 * 51:
        docs += stream.document("challenger" if stream.rng.random() < TINY.challenger_frac else "solver")
    assert all(x.shape == (3, 51) for x in xs)
    assert torch.equal(torch.cat([x.flatten() for x in xs]), torch.tensor(docs[:3 * 3 * 51]))
    assert tok.pad_token_id not in docs


def test_challenger_and_solver_documents_draw_levels_by_their_own_weights(tiny_toy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_toy[0])
    cfg = toy.ToyConfig(levels=(0, 0, 1, 1), challenger_levels=(1, 0, 0, 0))
    corpus, chal = toy.Corpus(tok, cfg), challenger.challenger_prompt(tok)
    questions = [challenger.parse_question(tok.decode(corpus.document("challenger")[len(chal):],
                                                      skip_special_tokens=True)) for _ in range(30)]
    assert {len(str(toy.parse(q)[0][0])) for q in questions} == {2}  # level 1 only: a 2-digit number times a digit
    problems = [tok.decode(corpus.document("solver")).split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
                for _ in range(60)]
    digits = {len(str(toy.parse(p)[0][0])) for p in problems}
    assert digits == {4, 5}  # levels 3 and 4 only


def test_cache_key_follows_prompts_and_settings(monkeypatch):
    key = toy.cache_key(TINY)
    assert toy.cache_key(TINY) == key and toy.cache_key(toy.ToyConfig(seed=2)) != toy.cache_key(toy.ToyConfig())
    monkeypatch.setattr(solver, "SOLVER_SYSTEM", solver.SOLVER_SYSTEM + " ")
    assert toy.cache_key(TINY) != key


def test_the_shipped_world_is_the_one_the_readme_describes():
    """toy_world/ (what --model toy loads, on every machine): its weights' checksum is toy.WORLD_SHA256, which the
    README names; it loads as a checkpoint; its base model's numbers ship beside it and are the README's base row."""
    import hashlib
    import json
    import re

    from model import Transformer
    from runtime import resolve_model
    from transformers import AutoTokenizer

    assert resolve_model("toy") == TOY_WORLD
    with open(os.path.join(TOY_WORLD, "model.safetensors"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == toy.WORLD_SHA256
    with open(os.path.join(os.path.dirname(TOY_WORLD), "README.md")) as f:
        readme = f.read()
    assert toy.WORLD_SHA256 in readme
    tok, model = AutoTokenizer.from_pretrained(TOY_WORLD), Transformer.from_pretrained(TOY_WORLD)
    assert model.num_params() < 1_000_000 and tok.decode(tok.encode("What is 379 * 4?")) == "What is 379 * 4?"
    with open(os.path.join(TOY_WORLD, "measure-512-4-160-cpu-float32.json")) as f:
        base = json.load(f)
    row = re.search(r"\nbase +- +- +- +- +- +([0-9.]+) +([0-9.]+)\n", readme)
    assert row and (row[1], row[2]) == (f"{base['greedy']:.3f}", f"{base['mean_at_k']:.3f}")


def test_toy_path_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RZERO_CACHE", str(tmp_path))
    path = toy.toy_path(cfg=TINY)
    assert path.startswith(str(tmp_path)) and os.path.isfile(os.path.join(path, "config.json"))
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert toy.toy_path(cfg=TINY) == path and os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp


def test_heldout_accuracy_and_question_stats(tiny_toy):
    from transformers import AutoTokenizer

    from model import Transformer

    tok = AutoTokenizer.from_pretrained(tiny_toy[0])
    model = Transformer.from_pretrained(tiny_toy[0]).eval()
    probs = toy.heldout_problems(14)
    res = toy.heldout_accuracy(model, tok, probs, k=2, max_new_tokens=4)
    assert res["n"] == 14 and sum(r["n"] for r in res["by_difficulty"].values()) == 14
    assert all(0.0 <= res[k] <= 1.0 for k in ("greedy", "mean_at_k", "maj_at_k"))
    st = toy.question_stats(["What is 1 + 2?", "What is 1 + 2?", "What is 379 * 4?", None, "Prove it."])
    assert st["valid"] == 0.6 and st["distinct"] == pytest.approx(2 / 3)
    assert st["mean_difficulty"] == pytest.approx((1 + 1 + 5) / 3) and st["difficulty_hist"] == {1: 2, 5: 1}


def test_heldout_accuracy_on_scripted_answers(tiny_toy, monkeypatch):
    """greedy, mean@k and maj@k (the method's majority vote: equivalence, ties to the first answer) by hand."""
    import engine
    import sample
    from transformers import AutoTokenizer

    probs = ["What is 47 + 38?", "What is 379 * 4?", "What is 47 * 6?"]  # 85 (difficulty 1), 1516 (5), 282 (3)
    greedy = [["\\boxed{85}"], ["\\boxed{1516}"], ["\\boxed{281}"]]
    sampled = [["\\boxed{85}", "\\boxed{84}", "\\boxed{85.0}"],  # 2/3 right, majority 85 (85 == 85.0)
               ["\\boxed{1516}", "\\boxed{7}", "\\boxed{7.0}"],  # 1/3 right, majority 7
               ["\\boxed{282}", "\\boxed{1}", "no box"]]  # 1/3 right, a 1-1 tie: the first answer, 282, wins
    calls = []

    def fake(model, prompts, n=1, temperature=1.0, **kw):
        calls.append((n, temperature))
        rows = greedy if temperature == 0.0 else sampled
        return [[sample.Completion([], [], "eos", t) for t in r] for r in rows]

    monkeypatch.setattr(engine, "generate", fake)
    res = toy.heldout_accuracy(None, AutoTokenizer.from_pretrained(tiny_toy[0]), probs, k=3)
    assert calls == [(1, 0.0), (3, 1.0)]  # one greedy call and one sampled call over all problems
    assert (res["n"], res["greedy"]) == (3, pytest.approx(2 / 3))
    assert res["mean_at_k"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert res["maj_at_k"] == pytest.approx(2 / 3)
    assert res["by_difficulty"] == {1: dict(n=1, greedy=1.0, mean_at_k=pytest.approx(2 / 3), maj_at_k=1.0),
                                    3: dict(n=1, greedy=0.0, mean_at_k=pytest.approx(1 / 3), maj_at_k=1.0),
                                    5: dict(n=1, greedy=1.0, mean_at_k=pytest.approx(1 / 3), maj_at_k=0.0)}


def test_measure_reads_what_an_iteration_wrote(tiny_toy, tmp_path):
    import json

    from transformers import AutoTokenizer

    from model import Transformer

    path = tiny_toy[0]
    it = tmp_path / "iter1"
    it.mkdir()
    (it / "questions.json").write_text(json.dumps(["What is 1 + 2?", "What is 1 + 2?", "What is 379 * 4?", None,
                                                   "Prove it."]))
    records = [dict(problem="What is 1 + 2?", pseudo_label="3", p=0.5),  # right
               dict(problem="What is 379 * 4?", pseudo_label="1515", p=0.4),  # wrong
               dict(problem="What is 47 + 38?", pseudo_label="85.0", p=0.7)]  # right (equivalent)
    (it / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    res = toy.measure(path, str(it), problems=6, k=2, max_new_tokens=4)
    assert res["pseudo_acc"] == pytest.approx(2 / 3)
    assert res["difficulty"] == pytest.approx((1 + 1 + 5) / 3) and res["distinct"] == pytest.approx(2 / 3)
    assert res["questions"]["n"] == 5 and res["questions"]["valid"] == 0.6
    # the held-out part is the Solver folder's own heldout_accuracy on the first `problems` held-out problems
    model = Transformer.from_pretrained(path).eval()
    direct = toy.heldout_accuracy(model, AutoTokenizer.from_pretrained(path), toy.heldout_problems(6), k=2,
                                  max_new_tokens=4)
    assert {k: res[k] for k in direct} == direct and res["n"] == 6
    base = toy.measure(path, None, problems=6, k=2, max_new_tokens=4)  # the base: no iteration to read
    assert base == direct
    # every column of train.py's summary table is a number measure returns
    cols = toy.columns(4)
    assert [c[0] for c in cols][-1] == "mean@4" and toy.columns(7)[-1][0] == "mean@7"
    assert all(k in res and isinstance(res[k], float) for _, _, k, _ in cols)


def test_a_two_step_toy_run(tmp_path, small_toy):
    """train.py on a toy world: one Challenger step and one Solver step, measured by the checker (held-out accuracy
    before and after, pseudo-label accuracy, question stats) and printed in the summary table."""
    import json
    import shutil

    from conftest import train_here

    world, out = str(tmp_path / "world"), str(tmp_path / "run")
    shutil.copytree(small_toy, world, ignore=shutil.ignore_patterns("measure-*"))  # no kept base numbers yet
    cmd = ["--model", world, "--out-dir", out, "--iterations", "1", "--challenger-steps", "1", "--solver-steps", "1",
           "--challenger-prompts", "4", "--m-answers", "4", "--n-problems", "16", "--solver-problems", "4",
           "--eval-problems", "8", "--no-filter", "--micro-batch", "8"]
    r = train_here(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(m["phase"], m.get("step")) for m in rows] == [("challenger", 0), ("dataset", None), ("solver", 0)]
    ds = rows[1]
    assert ds["kept"] > 0 and ds["generated"] == 16
    with open(os.path.join(out, "iter1", "questions.json")) as f:
        questions = json.load(f)  # every generated question, None where unparsable
    assert len(questions) == 16 and sum(q is None for q in questions) == ds["unparsable"]
    with open(os.path.join(out, "base_measure.json")) as f:
        base = json.load(f)
    with open(os.path.join(out, "iter1", "measure.json")) as f:
        it = json.load(f)
    assert base["n"] == it["n"] == 8 and "pseudo_acc" not in base
    assert 0 <= it["pseudo_acc"] <= 1 and it["questions"]["n"] == 16 and it["questions"]["valid"] > 0
    assert it["difficulty"] == it["questions"]["mean_difficulty"] and it["distinct"] == it["questions"]["distinct"]
    assert "pseudo acc" in r.stdout and "mean@4" in r.stdout
    assert "where the time went" in r.stdout and "held-out measuring" in r.stdout
    # the base model's numbers are kept beside the world; the next run on it reads them instead of measuring
    kept = [f for f in os.listdir(world) if f.startswith("measure-8-4-")]
    assert len(kept) == 1
    with open(os.path.join(world, kept[0])) as f:
        assert json.load(f) == base
    with open(os.path.join(world, kept[0]), "w") as f:
        json.dump(dict(base, greedy=-1.0), f)  # a marker: only a reused file holds it
    cmd[cmd.index(out)] = out2 = str(tmp_path / "run2")
    r = train_here(cmd + ["--challenger-steps", "0", "--solver-steps", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out2, "base_measure.json")) as f:
        assert json.load(f)["greedy"] == -1.0
