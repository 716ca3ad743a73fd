import pytest

from conch.paths import staged


class Boom(Exception):
    pass


def test_staged_moves_a_finished_folder_into_place(tmp_path):
    target = tmp_path / "out" / "model"
    with staged(target) as tmp:
        assert tmp == target.with_name("model.tmp") and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "weights.bin").write_text("new")
    assert (target / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_staged_replaces_an_existing_folder_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    with staged(target) as tmp:
        (tmp / "weights.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp, no .old


def test_a_failure_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("old")
    with pytest.raises(Boom):
        with staged(target) as tmp:
            (tmp / "weights.bin").write_text("half")
            raise Boom
    assert (target / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failure_without_an_old_folder_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with staged(target) as tmp:
            (tmp / "weights.bin").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_leftover_temporary_folder_is_cleared_first(tmp_path):
    target = tmp_path / "model"
    leftover = target.with_name("model.tmp")
    leftover.mkdir()
    (leftover / "junk").write_text("from an interrupted run")
    with staged(target) as tmp:
        assert not any(tmp.iterdir())
        (tmp / "weights.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]


def test_overlay_replaces_namesakes_and_keeps_the_rest(tmp_path):
    target = tmp_path / "run"
    (target / "checkpoint-10").mkdir(parents=True)
    (target / "trainer_log.jsonl").write_text("log")
    (target / "adapter_model.safetensors").write_text("old")
    (target / "sub").mkdir()
    (target / "sub" / "stale").write_text("old")
    with staged(target, overlay=True) as tmp:
        assert tmp == target / ".staged.tmp" and not any(tmp.iterdir())
        (tmp / "adapter_model.safetensors").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "fresh").write_text("new")
    assert (target / "adapter_model.safetensors").read_text() == "new"
    assert sorted(p.name for p in (target / "sub").iterdir()) == ["fresh"]
    assert sorted(p.name for p in target.iterdir()) == ["adapter_model.safetensors", "checkpoint-10", "sub",
                                                        "trainer_log.jsonl"]  # no .staged.tmp
    assert (target / "trainer_log.jsonl").read_text() == "log"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overlay_failure_leaves_the_folder_untouched(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "adapter_model.safetensors").write_text("old")
    with pytest.raises(Boom):
        with staged(target, overlay=True) as tmp:
            (tmp / "adapter_model.safetensors").write_text("half")
            raise Boom
    assert sorted(p.name for p in target.iterdir()) == ["adapter_model.safetensors"]
    assert (target / "adapter_model.safetensors").read_text() == "old"


def test_overlay_into_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with staged(".", overlay=True) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["adapter_config.json"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("old")
    rename = type(target).rename

    def refuse_the_new_one(self, to):
        if self.name == "model.tmp":
            raise OSError("disk trouble")
        return rename(self, to)

    monkeypatch.setattr(type(target), "rename", refuse_the_new_one)
    with pytest.raises(OSError, match="disk trouble"):
        with staged(target) as tmp:
            (tmp / "weights.bin").write_text("new")
    assert (target / "weights.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_paths_is_a_leaf_module():
    import ast
    import conch.paths

    tree = ast.parse(open(conch.paths.__file__, encoding="utf-8").read())
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or "conch" in (n.module or ""))]
    assert relative == []
