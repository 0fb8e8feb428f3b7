"""Balance heatmaps while training: the rendering, and real TensorBoard event files written by the HF
Trainer callback and the Accelerate wrapper, read back with TensorBoard's own EventAccumulator.
(The Lightning callback's images are tested in tests/test_lightning.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from moe_balance.plot import HEATMAP_TAG, MAXVIO_TAG, BalanceImages, balance_images  # noqa: E402

from .accelerate_helpers import tracked_accelerate_run  # noqa: E402

TAGS = {HEATMAP_TAG, MAXVIO_TAG}


def _events(root: Path) -> EventAccumulator:
    dirs = sorted({p.parent for p in Path(root).rglob("events.out.tfevents.*")})
    assert len(dirs) == 1, dirs
    return EventAccumulator(str(dirs[0]), size_guidance={"images": 0, "scalars": 0}).Reload()


def test_rendering_depends_on_the_loads():
    skewed = balance_images([[60, 20, 0, 0], [40, 40, 0, 0]], steps=[1, 2], maxvio=[3.0, 1.0])
    even = balance_images([[20, 20, 20, 20], [20, 20, 20, 20]], steps=[1, 2], maxvio=[3.0, 1.0])
    assert set(skewed) == TAGS
    for image in skewed.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 50
    assert skewed[HEATMAP_TAG].shape == even[HEATMAP_TAG].shape
    assert not np.array_equal(skewed[HEATMAP_TAG], even[HEATMAP_TAG])  # the picture shows the loads
    assert np.array_equal(skewed[MAXVIO_TAG], even[MAXVIO_TAG])  # same curve, same picture
    with pytest.raises(ValueError):
        BalanceImages(every=-1)


def _hf_run(tmp_path, **cb_fields):
    from transformers import Trainer

    from moe_balance.integrations.hf import MoEBalanceCallback

    from .hf_helpers import args, datasets, load, saved_checkpoint
    train_ds, _ = datasets(n_train=48)
    out = tmp_path / "out"
    trainer = Trainer(model=load(saved_checkpoint("mixtral", tmp_path / "ckpt")),
                      args=args(out, max_steps=6, logging_steps=1, per_device_train_batch_size=4,
                                report_to=["tensorboard"]),
                      train_dataset=train_ds, callbacks=[MoEBalanceCallback(bias_update="sign", **cb_fields)])
    trainer.train()
    return _events(out)


def test_hf_trainer_sends_heatmaps_to_tensorboard(tmp_path):
    events = _hf_run(tmp_path, heatmap_every=4)
    assert TAGS <= set(events.Tags()["images"])
    assert [e.step for e in events.Images(HEATMAP_TAG)] == [1, 5]  # logging steps 1..6, every 4th, first included
    assert [e.step for e in events.Images(MAXVIO_TAG)] == [1, 5]
    assert "train/moe_balance/maxvio_global" in events.Tags()["scalars"]


def test_hf_trainer_heatmaps_off(tmp_path):
    events = _hf_run(tmp_path, heatmap_every=0)
    assert not events.Tags()["images"]
    assert "train/moe_balance/maxvio_global" in events.Tags()["scalars"]


def test_accelerate_sends_heatmaps_to_tensorboard(tmp_path):
    tracked_accelerate_run(tmp_path, "tensorboard", "run")
    events = _events(tmp_path)
    assert TAGS <= set(events.Tags()["images"])
    assert [e.step for e in events.Images(HEATMAP_TAG)] == [2, 6]  # logs at steps 2, 4, 6; every 2nd, first included
    assert "moe_balance/maxvio_global" in events.Tags()["scalars"]
