"""Tests for segjax.models.crf: the dense CRF's mean field, exact and on the lattice."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax.models import crf

PARAMS = dict(w1=4.0, theta_alpha=121.0, theta_beta=5.0, w2=3.0, theta_gamma=3.0)


def numpy_mean_field(logits, image, num_iterations, w1, theta_alpha, theta_beta, w2,
                     theta_gamma):
  """K&K Algorithm 1 with the explicit N x N kernel matrix, float64 (one image).

  logits: [H, W, C]; image: [H, W, 3]. Returns [H, W, C] marginals.
  """
  h, w, c = logits.shape
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  pos = np.stack([rows.ravel(), cols.ravel()], -1).astype(np.float64)
  rgb = image.reshape(-1, 3).astype(np.float64)
  dpos = ((pos[:, None] - pos[None]) ** 2).sum(-1)
  drgb = ((rgb[:, None] - rgb[None]) ** 2).sum(-1)
  kernel = (w1 * np.exp(-dpos / (2 * theta_alpha ** 2) - drgb / (2 * theta_beta ** 2))
            + w2 * np.exp(-dpos / (2 * theta_gamma ** 2)))
  np.fill_diagonal(kernel, 0.0)                       # j != i
  potts = 1.0 - np.eye(c)
  unary = -logits.reshape(-1, c).astype(np.float64)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  q = softmax(-unary)
  for _ in range(num_iterations):
    pairwise = (kernel @ q) @ potts
    q = softmax(-unary - pairwise)
  return q.reshape(h, w, c)


def two_region_scene(h, w, num_classes=3, *, image_noise=8.0, logit_noise=1.5, seed=0):
  """A disc and a right-hand band of distinct colours; logits = 2 one-hot + noise.

  The true label boundaries are exactly the colour edges. Returns image
  [1, H, W, 3], logits [1, H, W, C] float32 and the labels [H, W].
  """
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  label = (((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(h, w) / 3) ** 2).astype(int)
           + (xx > 0.75 * w))
  colours = np.array([[30., 60., 200.], [220., 40., 40.], [60., 200., 80.]])[:num_classes]
  image = np.clip(colours[label] + rng.normal(0, image_noise, (h, w, 3)), 0, 255)
  logits = 2.0 * np.eye(num_classes)[label] + rng.normal(0, logit_noise, (h, w, num_classes))
  return image[None].astype(np.float32), logits[None].astype(np.float32), label


def accuracy(probs, label):
  return float((np.asarray(probs)[0].argmax(-1) == label).mean())


@pytest.mark.parametrize('num_iterations', [1, 5])
def test_exact_matches_numpy_kernel_matrix(num_iterations):
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 255, (1, 6, 5, 3)).astype(np.float32)
  image[0, :, 3:] = image[0, 0, 0] + rng.normal(0, 3, (6, 2, 3))   # a near-uniform block
  logits = rng.normal(0, 1.5, (1, 6, 5, 3)).astype(np.float32)
  # Small thetas so that both kernels vary across the 6 x 5 image.
  params = dict(w1=4.0, theta_alpha=3.0, theta_beta=20.0, w2=3.0, theta_gamma=1.5)
  want = numpy_mean_field(logits[0], image[0], num_iterations, **params)
  # chunk_size=4 does not divide N = 30: exercises the padded last chunk.
  got = crf.dense_crf_exact(logits, image, num_iterations=num_iterations, chunk_size=4,
                            **params)
  np.testing.assert_allclose(np.asarray(got)[0], want, atol=2e-5)
  # The CRF moved the marginals a lot; the agreement is not softmax(logits) twice.
  assert np.abs(want - jax.nn.softmax(logits[0], -1)).max() > 0.3


def test_enclosing_simplex_is_a_lattice_simplex_around_the_point():
  features = jnp.asarray(np.random.default_rng(0).normal(0, 10, (4000, 5)), jnp.float32)
  vertices, weights = crf.enclosing_simplex(features)
  vertices, weights = np.asarray(vertices), np.asarray(weights)
  assert (vertices.sum(-1) == 0).all()
  for k in range(6):                       # vertex k is a remainder-k point
    assert ((vertices[:, k] - k) % 6 == 0).all()
  assert weights.min() >= 0
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  elevated = np.asarray(features, np.float64) @ crf._elevation_matrix(5).T
  np.testing.assert_allclose(np.einsum('nk,nki->ni', weights, vertices), elevated, atol=1e-3)


def test_lattice_filter_is_the_gaussian_on_dense_points():
  """Where the lattice is fully populated, splat-blur-slice is the Gaussian sum.

  2-D features on a jittered grid of spacing 0.15 (std units); interior points only.
  """
  rng = np.random.default_rng(0)
  grid = np.stack(np.meshgrid(np.arange(0, 10, 0.15), np.arange(0, 10, 0.15)), -1).reshape(-1, 2)
  feats = grid + rng.uniform(-0.07, 0.07, grid.shape)
  values = rng.uniform(0.5, 1.5, (len(feats), 2))
  want = np.exp(-0.5 * ((feats[:, None] - feats[None]) ** 2).sum(-1)) @ values
  lattice = crf.build_lattice(jnp.asarray(feats, jnp.float32))
  got = np.asarray(crf.lattice_filter(lattice, jnp.asarray(values, jnp.float32)))
  interior = np.all((feats > 3) & (feats < 7), -1)
  rel = np.abs(got / want - 1)[interior]
  assert rel.max() < 0.02, rel.max()


@pytest.mark.parametrize('scale', [2.0, 3000.0])    # packed 1-key sort / d-key fallback
def test_lattice_vertices_and_neighbors(scale):
  feats = jnp.asarray(np.random.default_rng(1).normal(0, scale, (300, 5)), jnp.float32)
  vertices, _ = crf.enclosing_simplex(feats)
  vertex_ids, _, points, num_points = crf.lattice_vertices(feats)
  vertices, vertex_ids = np.asarray(vertices), np.asarray(vertex_ids)
  points, num_points = np.asarray(points), int(num_points)
  # Ids name exactly the distinct vertices, and their coordinates are stored.
  assert num_points == len({tuple(v) for v in vertices.reshape(-1, 6)})
  np.testing.assert_array_equal(points[vertex_ids], vertices)
  neighbors = np.asarray(crf.lattice_neighbors(jnp.asarray(points)))
  size = len(points)
  real = {tuple(p): i for i, p in enumerate(points[:num_points])}
  found = 0
  for j in range(6):
    step = np.ones(6, int)
    step[j] -= 6
    for i in range(num_points):
      for side, sign in ((0, -1), (1, 1)):
        want = real.get(tuple(points[i] + sign * step), size)
        assert neighbors[j, side, i] == want
        found += want != size
  if scale == 2.0:
    assert found > 100                     # the check saw many real neighbours
  assert neighbors.shape == (6, 2, size + 1)
  assert (neighbors[:, :, num_points:] == size).all()


def test_gaussian_blur_matches_explicit_sum():
  x = np.random.default_rng(0).normal(size=(20, 17, 2)).astype(np.float32)
  pos = crf._pixel_positions(20, 17)
  kernel = np.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / (2 * 3.0 ** 2))
  want = (kernel @ x.reshape(-1, 2)).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(crf.gaussian_blur(jnp.asarray(x), 3.0)), want, atol=3e-3)


@pytest.mark.parametrize('params,min_agree,max_mean_diff', [
    (PARAMS, 0.99, 0.01),                                   # DeepLab defaults
    (dict(PARAMS, theta_alpha=10.0), 0.96, 0.03),           # spatial term matters too
])
def test_fast_matches_exact(params, min_agree, max_mean_diff):
  """Measured: argmax agreement 0.9965 / 0.969, mean |dp| 0.003 / 0.020.

  The lattice drops the mass it would blur onto vertices no pixel touches
  (Adams et al.'s sparse lattice), so messages come out ~15 % (defaults) to
  ~30 % (theta_alpha=10) low on this small, sparse 5-D point set.
  """
  image, logits, _ = two_region_scene(24, 24)
  exact = np.asarray(crf.dense_crf_exact(logits, image, **params))
  fast = np.asarray(crf.dense_crf_fast(logits, image, **params))
  assert (exact.argmax(-1) == fast.argmax(-1)).mean() >= min_agree
  assert np.abs(exact - fast).mean() <= max_mean_diff


def test_lattice_size_does_not_change_the_result():
  image, logits, _ = two_region_scene(16, 16, image_noise=1.0)
  feats = crf.appearance_features(jnp.asarray(image[0]), 121.0, 5.0)
  q = jax.nn.softmax(jnp.asarray(logits[0].reshape(-1, 3)), -1)
  full = crf.lattice_filter(crf.build_lattice(feats), q)
  _, _, _, num_points = crf.lattice_vertices(feats)
  assert int(num_points) <= len(q) * 6 // 16                # a small size gets picked
  picked = crf._with_lattice(feats, lambda lattice: crf.lattice_filter(lattice, q))
  np.testing.assert_allclose(np.asarray(picked), np.asarray(full), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('method', crf.METHODS)
def test_crf_follows_image_edges(method):
  image, logits, label = two_region_scene(24, 24)
  cfg = crf.default_crf_config()
  cfg.method = method
  before = accuracy(jax.nn.softmax(logits, -1), label)
  after = accuracy(crf.apply_crf(cfg, logits, image), label)
  assert before < 0.75
  assert after > 0.97


@pytest.mark.parametrize('method', crf.METHODS)
def test_batch_equals_per_image(method):
  images, logits = [], []
  for seed in range(2):
    image, logit, _ = two_region_scene(24, 24, seed=seed)
    images.append(image)
    logits.append(logit)
  cfg = crf.default_crf_config()
  cfg.method = method
  batched = jax.jit(lambda lg, im: crf.apply_crf(cfg, lg, im))(
      np.concatenate(logits), np.concatenate(images))
  for i in range(2):
    single = crf.apply_crf(cfg, logits[i], images[i])
    np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single[0]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(batched).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize('method', crf.METHODS)
def test_gradients_are_finite(method):
  image, logits, label = two_region_scene(24, 24)
  cfg = crf.default_crf_config()
  cfg.method = method

  def loss(lg, im):
    probs = crf.apply_crf(cfg, lg, im)
    return -jnp.mean(jnp.log(jnp.take_along_axis(probs[0], label[..., None], -1) + 1e-6))

  g_logits, g_image = jax.jit(jax.grad(loss, argnums=(0, 1)))(logits, image)
  assert np.isfinite(np.asarray(g_logits)).all() and np.isfinite(np.asarray(g_image)).all()
  assert np.abs(np.asarray(g_logits)).max() > 1e-4


def test_exact_gradient_matches_finite_differences():
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 255, (1, 4, 3, 3)).astype(np.float32)
  logits = rng.normal(0, 1, (1, 4, 3, 2)).astype(np.float32)
  params = dict(num_iterations=4, w1=1.0, theta_alpha=2.0, theta_beta=60.0, w2=0.5,
                theta_gamma=1.0)
  weights = rng.normal(size=(1, 4, 3, 2)).astype(np.float32)

  def f(lg, im):
    return jnp.sum(weights * crf.dense_crf_exact(lg, im, **params))

  g_logits, g_image = jax.grad(f, argnums=(0, 1))(logits, image)
  for arr, grad, index, eps in ((logits, g_logits, (0, 1, 2, 0), 1e-2),
                                (image, g_image, (0, 2, 1, 1), 1.0)):
    plus, minus = arr.copy(), arr.copy()
    plus[index] += eps
    minus[index] -= eps
    if arr is logits:
      numeric = (f(plus, image) - f(minus, image)) / (2 * eps)
    else:
      numeric = (f(logits, plus) - f(logits, minus)) / (2 * eps)
    assert abs(float(numeric)) > 1e-3
    np.testing.assert_allclose(float(grad[index]), float(numeric), rtol=2e-2)


def test_default_config_is_valid_and_deeplabs():
  cfg = crf.default_crf_config()
  crf.validate_crf_config(cfg)
  assert (cfg.enabled, cfg.method, cfg.num_iterations) == (False, 'fast', 10)
  assert (cfg.w2, cfg.theta_gamma) == (3.0, 3.0)            # DeepLab v1 §5


@pytest.mark.parametrize('field,value,match', [
    ('method', 'permutohedral', r"crf.method='permutohedral'.*\['fast', 'exact'\]"),
    ('num_iterations', 2.5, r'crf.num_iterations=2.5 must be an integer'),
    ('num_iterations', 0, r'crf.num_iterations=0'),
    ('theta_beta', 0.0, r'crf.theta_beta=0.0 must be a finite number > 0'),
    ('w1', -4.0, r'crf.w1=-4.0'),
    ('w2', float('nan'), r'crf.w2=nan'),
    ('enabled', 'yes', r"crf.enabled='yes' must be True or False"),
])
def test_validate_rejects_bad_values(field, value, match):
  # Built from a dict: ConfigDict's own type check would refuse 2.5 for an int field.
  cfg = ml_collections.ConfigDict(dict(crf.default_crf_config().to_dict(), **{field: value}))
  with pytest.raises(ValueError, match=match):
    crf.validate_crf_config(cfg)


def test_validate_rejects_unknown_and_missing_fields():
  cfg = crf.default_crf_config()
  cfg.theta_delta = 1.0
  with pytest.raises(ValueError, match=r"unknown crf config field\(s\) \['theta_delta'\]"):
    crf.validate_crf_config(cfg)
  cfg = crf.default_crf_config().to_dict()
  del cfg['w2']
  with pytest.raises(ValueError, match=r"missing field\(s\) \['w2'\]"):
    crf.validate_crf_config(ml_collections.ConfigDict(cfg))


def test_apply_crf_rejects_mismatched_shapes():
  cfg = crf.default_crf_config()
  with pytest.raises(ValueError, match=r'image must be \[B, H, W, 3\]'):
    crf.apply_crf(cfg, jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 4, 1)))
  with pytest.raises(ValueError, match='differ in'):
    crf.apply_crf(cfg, jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 5, 3)))
