from stvr.train import EpochIndexed, StepBatchSampler, learning_rate


def test_learning_rate_steps():
    assert learning_rate(0, 0.03, (10_000, 20_000), 0.1) == 0.03
    assert abs(learning_rate(10_000, 0.03, (10_000, 20_000), 0.1) - 0.003) < 1e-12
    assert abs(learning_rate(25_000, 0.03, (10_000, 20_000), 0.1) - 0.0003) < 1e-12


def test_step_sampler_is_a_function_of_step_and_splits_ranks():
    full = list(StepBatchSampler(10, 2, seed=3, start_step=0, end_step=12))
    assert len(full) == 12 and all(len(b) == 2 for b in full)
    # epochs of 5 steps: each epoch visits every index once
    for e in range(2):
        seen = sorted(i - e * 10 for b in full[5 * e:5 * e + 5] for i in b)
        assert seen == list(range(10))
    assert full[:5] != [[i + 10 for i in b] for b in full[5:10]]  # reshuffled per epoch
    # resuming at step 7 yields exactly the tail
    assert list(StepBatchSampler(10, 2, seed=3, start_step=7, end_step=12)) == full[7:]
    # two ranks split each step's samples without overlap
    r0 = list(StepBatchSampler(10, 2, seed=3, start_step=0, end_step=4, rank=0, world_size=2))
    r1 = list(StepBatchSampler(10, 2, seed=3, start_step=0, end_step=4, rank=1, world_size=2))
    for a, b in zip(r0, r1):
        assert not set(a) & set(b)


def test_epoch_indexed_passes_the_epoch():
    class D:
        epoch = None

        def __len__(self):
            return 4

        def set_epoch(self, e):
            self.epoch = e

        def __getitem__(self, i):
            return (self.epoch, i)

    w = EpochIndexed(D())
    assert w[9] == (2, 1) and w[3] == (0, 3)
