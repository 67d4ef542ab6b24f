"""Tests for the stn/cnn architectures: shapes for several sizes, whole-model gradients."""

import numpy as np
import pytest

from stn_numpy.gradcheck import numerical_gradient, rel_error
from stn_numpy.layers import cross_entropy
from stn_numpy.models import build_model
from stn_numpy.transformer import TRANSFORMS


def central_differences(loss_of, flat, picks, h=1e-6):
    """dL/dflat[i] for each i in picks, by central differences, restoring every entry."""
    num = np.empty(len(picks))
    for j, i in enumerate(picks):
        old = flat[i]
        flat[i] = old + h
        plus = loss_of()
        flat[i] = old - h
        minus = loss_of()
        flat[i] = old
        num[j] = (plus - minus) / (2 * h)
    return num


def check_parameter_gradients(model, grads, loss_of, rng, n_picks):
    """Compare ``grads`` with central differences on ``n_picks`` random entries of each
    parameter tensor."""
    for name, p in model.params.items():
        flat = p.reshape(-1)
        picks = rng.choice(flat.size, size=min(n_picks, flat.size), replace=False)
        num = central_differences(loss_of, flat, picks)
        assert rel_error(grads[name].reshape(-1)[picks], num) < 1e-5, name


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
    check_parameter_gradients(model, grads, loss_of, rng, 12)


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


@pytest.mark.parametrize("bad, pattern", [
    (np.full((1, 28, 28), 255.0), r"values in \[255.0, 255.0\]; divide uint8-range .* by 255"),
    (np.full((1, 28, 28), -0.5), r"X must hold images in \[0, 1\]"),
    (np.full((1, 28, 28), np.nan), "X contains 784 non-finite"),
    (np.full((1, 28, 28), np.inf), "X contains 784 non-finite"),
])
def test_predict_and_transform_reject_images_outside_the_unit_range(bad, pattern):
    model = build_model("stn")
    for method in (model.predict, model.transform):
        with pytest.raises(ValueError, match=pattern):
            method(bad)
    edges = np.zeros((2, 28, 28))
    edges[1] = 1.0
    assert model.predict(edges).shape == (2, 10)  # 0 and 1 themselves are fine


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True, "8"])
def test_predict_rejects_bad_batch_sizes(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        build_model("cnn").predict(np.zeros((3, 28, 28)), batch_size=batch_size)


@pytest.mark.parametrize("arch", ["stn", "cnn"])
@pytest.mark.parametrize("batch_size", [None, 4])
def test_empty_batch_gives_empty_outputs(arch, batch_size):
    model = build_model(arch, (42, 42))
    logits = model.predict(np.zeros((0, 1, 42, 42)), batch_size=batch_size)
    assert logits.shape == (0, 10) and logits.dtype == np.float32
    if arch == "stn":
        assert model.transform(np.zeros((0, 42, 42)), batch_size).shape == (0, 1, 42, 42)


@pytest.mark.parametrize("arch,transform", [("cnn", "affine")] + [("stn", t) for t in TRANSFORMS])
def test_empty_batch_passes_forward_and_backward(arch, transform):
    model = build_model(arch, transform=transform)
    logits = model.forward(np.zeros((0, 1, 28, 28), np.float32))
    assert logits.shape == (0, 10)
    assert model.backward(np.zeros((0, 10), np.float32)).shape == (0, 1, 28, 28)
    assert model.grads.keys() == model.params.keys()
    assert not any(g.any() for g in model.grads.values())


@pytest.mark.parametrize("seed", [2.0, 2.5, -1, "3", True, None])
def test_build_model_rejects_seeds_that_are_not_non_negative_ints(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        build_model("cnn", seed=seed)


def test_batches_agree_with_one_pass():
    model = build_model("stn", seed=2)
    X = np.random.default_rng(1).random((5, 28, 28))
    np.testing.assert_allclose(model.predict(X, batch_size=2), model.predict(X), atol=1e-6)


@pytest.mark.parametrize("arch, smallest", [("cnn", 16), ("stn", 18)])
def test_smallest_input_size(arch, smallest):
    # The stated minimum is exact: it builds and runs, one pixel less is refused up front.
    model = build_model(arch, (smallest, smallest + 3))
    assert model.predict(np.zeros((1, smallest, smallest + 3))).shape == (1, 10)
    for size in [(smallest - 1, 28), (28, smallest - 1)]:
        with pytest.raises(ValueError, match=f"at least {smallest}x{smallest} for arch='{arch}'"):
            build_model(arch, size)


@pytest.mark.parametrize("arch", ["stn", "cnn"])
@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"input_size": (28.0, 28)}, TypeError, r"input_size must be a pair \(H, W\) of ints"),
    ({"input_size": 28}, TypeError, r"input_size must be a pair \(H, W\) of ints"),
    ({"input_size": (28, 28, 1)}, ValueError, r"input_size must be a pair \(H, W\)"),
    ({"transform": "rigid"}, ValueError, "transform must be one of"),
    ({"mode": "linear"}, ValueError, "mode must be one of"),
    ({"padding_mode": "wrap"}, ValueError, "padding_mode must be one of"),
    ({"align_corners": "yes"}, ValueError, "align_corners must be one of"),
    ({"dtype": np.float16}, TypeError, "dtype must be float32 or float64, got float16"),
    ({"dtype": np.int32}, TypeError, "dtype must be float32 or float64, got int32"),
])
def test_build_model_validates_every_argument_for_both_archs(arch, kwargs, error, pattern):
    # A cnn ignores the transformer's options, but they are saved in its config.
    with pytest.raises(error, match=pattern):
        build_model(arch, **kwargs)


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("resnet")


@pytest.mark.parametrize("arch", ["stn", "cnn"])
def test_backward_without_input_grad_gives_the_same_parameter_gradients(arch, rng):
    model = build_model(arch, seed=0, dtype=np.float64)
    head = model.transformer.localization[-1].params if model.transformer else {}
    for p in head.values():  # a transformer away from the identity, so every path counts
        p += 0.05 * rng.standard_normal(p.shape)
    X = rng.random((3, 1, 28, 28))
    y = np.array([1, 2, 3])
    grads = []
    for input_grad in (True, False):
        for layer in model.net:
            if hasattr(layer, "rng"):
                layer.rng = np.random.default_rng(1)
        dX = model.backward(cross_entropy(model.forward(X, train=True), y)[1],
                            input_grad=input_grad)
        assert (dX is None) == (not input_grad)
        grads.append({k: v.copy() for k, v in model.grads.items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        np.testing.assert_array_equal(grads[0][name], grads[1][name], err_msg=name)


@pytest.mark.parametrize("size, st_size, pooled", [(28, None, False), (42, 28, True),
                                                   (60, 28, True), (60, None, True)])
def test_paper_models_shapes(size, st_size, pooled):
    X = np.random.default_rng(0).random((2, size, size))
    cnn = build_model("paper-cnn", (size, size))
    assert cnn.predict(X).shape == (2, 10)
    st = build_model("paper-stcnn", (size, size), st_size=st_size)
    assert st.predict(X).shape == (2, 10)
    side = st_size or size
    V = st.transform(X)
    assert V.shape == (2, 1, side, side)
    if st_size is None:
        np.testing.assert_allclose(V[:, 0], X, atol=1e-5)
    loc = st.transformer.localization
    assert (type(loc[1]).__name__ == "MaxPool2d") == pooled
    # The classifier's first conv has 9x9 kernels, the second 7x7, as in the paper.
    convs = [p.shape for k, p in st.params.items() if k.endswith("weight") and p.ndim == 4]
    assert [c[-1] for c in convs] == [5, 5, 9, 7]


@pytest.mark.parametrize("transform, n_params", [("affine", 6), ("projective", 8),
                                                 ("tps", 32)])
def test_paper_stcnn_heads(transform, n_params):
    model = build_model("paper-stcnn", transform=transform)
    assert model.transformer.localization[-1].out_features == n_params
    X = np.random.default_rng(1).random((2, 28, 28))
    np.testing.assert_allclose(model.transform(X)[:, 0], X, atol=1e-5)


def test_st_size_checks():
    with pytest.raises(ValueError, match="st_size needs a model with a spatial transformer"):
        build_model("paper-cnn", (42, 42), st_size=28)
    with pytest.raises(ValueError, match="st_size must be at least 24x24"):
        build_model("paper-stcnn", (42, 42), st_size=20)
    with pytest.raises(TypeError, match="st_size must be an int or a pair"):
        build_model("paper-stcnn", (42, 42), st_size=28.5)
    with pytest.raises(ValueError, match="input_size must be at least 24x24"):
        build_model("paper-cnn", (20, 20))
    assert build_model("stn", (42, 42), st_size=(20, 30)).transform(
        np.zeros((1, 42, 42))).shape == (1, 1, 20, 30)


@pytest.mark.parametrize("arch, transform, loc_net", [
    ("paper-stcnn", "affine", None), ("paper-stfcn", "similarity", None),
    ("paper-stcnn", "similarity", "fcn")])
def test_paper_st_models_gradients_with_a_smaller_output(arch, transform, loc_net):
    """Loss w.r.t. the input and every parameter, float64, a 32x32 input (the localisation
    net pools it first) sampled to 24x24: every path of the architecture, either
    localisation net in front of either classifier."""
    rng = np.random.default_rng(4)
    model = build_model(arch, (32, 32), transform=transform, seed=2, dtype=np.float64,
                        st_size=24, loc_net=loc_net)
    head = model.transformer.localization[-1].params
    head["weight"][...] = 0.05 * rng.standard_normal(head["weight"].shape)
    X = rng.random((2, 1, 32, 32))
    y = np.array([1, 8])

    def loss_of(x=X):
        return cross_entropy(model.forward(x, train=True), y)[0]

    dX = model.backward(cross_entropy(model.forward(X, train=True), y)[1])
    picks = rng.choice(X.size, size=40, replace=False)
    num = central_differences(loss_of, X.reshape(-1), picks)
    assert rel_error(dX.reshape(-1)[picks], num) < 1e-5
    check_parameter_gradients(model, {k: v.copy() for k, v in model.grads.items()}, loss_of,
                              rng, 8)


@pytest.mark.parametrize("size, st_size, pooled", [(28, None, False), (42, 28, True)])
def test_paper_fcn_models_shapes(size, st_size, pooled):
    # The FCN: two hidden layers of 128 units; the ST-FCN's localisation net: 32, 32, P.
    X = np.random.default_rng(0).random((2, size, size))
    fcn = build_model("paper-fcn", (size, size))
    assert fcn.predict(X).shape == (2, 10)
    assert [p.shape for k, p in fcn.params.items() if k.endswith("weight")] == [
        (128, size * size), (128, 128), (10, 128)]
    st = build_model("paper-stfcn", (size, size), st_size=st_size)
    side = st_size or size
    assert st.predict(X).shape == (2, 10) and st.transform(X).shape == (2, 1, side, side)
    loc = st.transformer.localization
    assert (type(loc[1]).__name__ == "MaxPool2d") == pooled
    assert [p.shape[0] for k, p in loc.params.items() if k.endswith("weight")] == [32, 32, 6]
    if st_size is None:
        np.testing.assert_allclose(st.transform(X)[:, 0], X, atol=1e-5)
    assert st.config["loc_net"] == "fcn" and fcn.config["loc_net"] is None


@pytest.mark.parametrize("arch, loc_net, first", [("paper-stcnn", "fcn", "Flatten"),
                                                  ("paper-stfcn", "cnn", "Conv2d")])
def test_loc_net_puts_the_other_localisation_net_in_front(arch, loc_net, first):
    model = build_model(arch, (28, 28), transform="similarity", loc_net=loc_net)
    loc = model.transformer.localization
    assert type(loc[1]).__name__ == first and loc[-1].out_features == 4
    assert model.config["loc_net"] == loc_net
    X = np.random.default_rng(1).random((2, 28, 28))
    np.testing.assert_allclose(model.transform(X)[:, 0], X, atol=1e-5)  # zeros: identity


def test_loc_net_checks():
    with pytest.raises(ValueError, match="loc_net must be one of"):
        build_model("paper-stcnn", loc_net="rnn")
    with pytest.raises(ValueError, match="arch='stn' has none to choose"):
        build_model("stn", loc_net="fcn")
    with pytest.raises(ValueError, match="arch='paper-cnn' has none to choose"):
        build_model("paper-cnn", loc_net="cnn")
    # The convolutional localisation net needs 16 pixels a side, the FCN classifier none.
    with pytest.raises(ValueError, match="at least 16x16 for arch='paper-stfcn', loc_net='cnn'"):
        build_model("paper-stfcn", (15, 28), loc_net="cnn")
    assert build_model("paper-stfcn", (5, 7)).predict(np.zeros((1, 5, 7))).shape == (1, 10)


def test_a_config_without_loc_net_rebuilds_the_models_own():
    # Checkpoints written before loc_net existed name none: the model's own is rebuilt.
    from stn_numpy.checkpoint import model_from_params

    model = build_model("paper-stcnn", (28, 28))
    config = {k: v for k, v in model.config.items() if k != "loc_net"}
    again = model_from_params(config, model.params)
    assert again.config == model.config
