"""One cache contract: every stage that reads a cache refuses one that does not fit, in one line."""

from __future__ import annotations

import pytest

from pipeline.cache import TeacherCache
from pipeline.errors import PipelineError
from pipeline.shards import list_shards
from stages import bench, distill, precompute, supervised
from tests.conftest import make_demo_shards, precompute_config, stage_config
from tests.test_distill import distill_config


@pytest.fixture(scope="module")
def rebuilt(tiny_teacher, tmp_path_factory):
    """A cache over shards that were then rebuilt under the same names with other images."""
    root = tmp_path_factory.mktemp("rebuilt")
    shards = make_demo_shards(root / "shards", train=64, val=8, seed=0)
    cache = root / "teacher.h5"
    precompute.run(precompute_config(shards, cache, tiny_teacher))
    make_demo_shards(root / "shards", train=64, val=8, seed=1)
    return shards, cache


CHANGED = r"teacher\.h5: the shards in .*shards changed since it was computed \(same names, other contents\)"


def test_distill_supervised_and_bench_refuse_shards_rebuilt_under_the_same_names(rebuilt, tiny_teacher, tmp_path):
    shards, cache = rebuilt
    config = distill_config(shards, cache, tiny_teacher, tmp_path)
    with pytest.raises(PipelineError, match=CHANGED):
        distill.run(config)
    with pytest.raises(PipelineError, match=CHANGED):
        supervised.run(stage_config("supervised", out=str(tmp_path / "s.pt"), run_dir=str(tmp_path / "s"),
                                    **{"train.shards": str(shards), "train.cache": str(cache)}))
    teacher_config, weights = tiny_teacher
    with pytest.raises(PipelineError, match=CHANGED):
        bench.run(stage_config("bench", train__shards=str(shards), train__cache=str(cache),
                               **{"teacher.config": str(teacher_config), "teacher.checkpoint": str(weights)}))
    assert not list(tmp_path.rglob("*.pt"))


def test_require_names_what_differs(demo_shards, tiny_teacher, tmp_path):
    cache_path = tmp_path / "teacher.h5"
    precompute.run(precompute_config(demo_shards, cache_path, tiny_teacher))
    cache = TeacherCache(cache_path)
    shards = list_shards(demo_shards, "train")
    cache.require(teacher_identity=cache.header.teacher_identity, prompt_digest=cache.header.prompt_digest,
                  shards=shards, labels=True)  # the cache's own values fit
    with pytest.raises(PipelineError, match=r"computed over 3 shards \(train-000000.tar \.\.\.\), not the 2 in"):
        cache.require(shards=shards[:2])
    with pytest.raises(PipelineError, match=r"anchor digest \w{12} \(cpa prompts, class anchors\) differs from the "
                                            r"params' 000000000000 \(plain\); re-run precompute or fix the prompt"):
        cache.require(prompt_digest="0" * 64, prompts="plain")
    with pytest.raises(PipelineError, match=r"holds no teacher image embeddings; re-run precompute with "
                                            r"--store-embeddings"):
        cache.require(embeddings=True)
    with pytest.raises(PipelineError,
                       match=r"made by another teacher than the params' \(act: cache gelu, params xgelu\); fix it"):
        cache.require(teacher_identity=cache.header.teacher_identity.replace("act=", "act=x"), fix="fix it")
