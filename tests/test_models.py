"""Tests for the stn/cnn architectures: shapes for several sizes, whole-model gradients."""

import numpy as np
import pytest

from stn_numpy.gradcheck import numerical_gradient, rel_error
from stn_numpy.layers import cross_entropy
from stn_numpy.models import build_model


@pytest.mark.parametrize("arch", ["stn", "cnn"])
@pytest.mark.parametrize("size", [(28, 28), (42, 42), (60, 60)])
def test_builds_for_input_sizes(arch, size):
    model = build_model(arch, size)
    X = np.random.default_rng(0).random((3, *size))
    assert model.predict(X).shape == (3, 10)
    if arch == "stn":
        V = model.transform(X)
        np.testing.assert_allclose(V[:, 0], X, atol=1e-5)  # identity at initialisation


def test_whole_stn_model_gradients_match_finite_differences():
    """Loss w.r.t. input pixels and every parameter tensor, float64, tiny batch.

    Dropout draws from the model's generator, so it is rewound before every forward pass
    (the masks stay fixed and their backward is checked too). The localisation head is moved
    off its zero start so that gradient reaches every localisation weight. Every input pixel
    is checked; each parameter tensor on 12 random entries, which keeps the test fast.
    """
    rng = np.random.default_rng(3)
    model = build_model("stn", (28, 28), seed=1, dtype=np.float64)
    head = model.transformer.localization[-1].params
    head["weight"][...] = 0.02 * rng.standard_normal(head["weight"].shape)
    X = rng.random((2, 1, 28, 28))
    y = np.array([3, 7])
    dropout_rng = model.net[6].rng  # stn, normalize, conv, pool, relu, conv, dropout2d
    state = dropout_rng.bit_generator.state

    def loss_of(x=X):
        dropout_rng.bit_generator.state = state
        return cross_entropy(model.forward(x, train=True), y)[0]

    dropout_rng.bit_generator.state = state
    dX = model.backward(cross_entropy(model.forward(X, train=True), y)[1])
    assert rel_error(dX, numerical_gradient(loss_of, X.copy())) < 1e-5
    grads = {k: v.copy() for k, v in model.grads.items()}
    assert len(grads) == 16
    for name, p in model.params.items():
        flat = p.reshape(-1)
        picks = rng.choice(flat.size, size=min(12, flat.size), replace=False)
        num = np.empty(len(picks))
        for j, i in enumerate(picks):
            old = flat[i]
            flat[i] = old + 1e-6
            plus = loss_of()
            flat[i] = old - 1e-6
            minus = loss_of()
            flat[i] = old
            num[j] = (plus - minus) / 2e-6
        assert rel_error(grads[name].reshape(-1)[picks], num) < 1e-5, name


def test_predict_accepts_any_float_and_checks_shape():
    model = build_model("cnn")
    X = np.zeros((2, 28, 28), dtype=np.float16)
    assert model.predict(X).dtype == np.float32
    with pytest.raises(ValueError, match=r"X must have shape \(N, 28, 28\)"):
        model.predict(np.zeros((2, 1, 30, 28)))
    with pytest.raises(TypeError, match="X must be float images"):
        model.predict(np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match="has no spatial transformer"):
        model.transform(X)


def test_same_seed_same_weights():
    a, b = build_model("stn", seed=5), build_model("stn", seed=5)
    c = build_model("stn", seed=6)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not all(np.array_equal(a.params[k], c.params[k]) for k in a.params)
