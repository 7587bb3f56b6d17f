// Fused routing-by-agreement passes for CPU (built and loaded by capsdist/models/routing.py).
//
// Why: on CPU each routing iteration is memory-bound on the votes (I, N = B*J, D). Written with
// torch ops, an iteration reads them twice (agreement, then weighted sum) through strided batched
// GEMVs of width D = 16, and the backward pass adds a full-size temporary and a permuting copy.
// Here one pass per iteration reads each input capsule's J x D votes once, and does everything
// that depends on them while they are in cache. Maths: capsdist/models/routing.py.
//
// Layouts: votes (I, B, J, D) contiguous; couplings, logits and their gradients (B, J, I);
// capsule vectors (B, J, D). Parallel over the batch: every example routes independently.
#include <torch/extension.h>

#include <vector>

namespace {

template <typename T>
void softmax_classes(const T* logits_j, int64_t stride, int64_t num_classes, bool leaky,
                     T* out) {
  T top = leaky ? T(0) : logits_j[0];
  for (int64_t j = 0; j < num_classes; ++j) top = std::max(top, logits_j[j * stride]);
  T total = leaky ? std::exp(-top) : T(0);  // the leaky "orphan" class has logit 0
  for (int64_t j = 0; j < num_classes; ++j) {
    out[j] = std::exp(logits_j[j * stride] - top);
    total += out[j];
  }
  for (int64_t j = 0; j < num_classes; ++j) out[j] /= total;
}

// One forward iteration: logits += votes . v_prev; c = softmax_j(logits); s = sum_i c * votes.
template <typename T>
void forward_pass(const T* votes, const T* v_prev, T* logits, T* couplings, T* s, int64_t B,
                  int64_t I, int64_t J, int64_t D, bool leaky) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> c(J), acc(J * D);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), T(0));
      const T* v = v_prev + b * J * D;
      T* lg = logits + b * J * I;
      for (int64_t i = 0; i < I; ++i) {
        const T* row = votes + (i * B + b) * J * D;
        for (int64_t j = 0; j < J; ++j) {
          T dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += row[j * D + d] * v[j * D + d];
          lg[j * I + i] += dot;
        }
        softmax_classes(lg + i, I, J, leaky, c.data());
        for (int64_t j = 0; j < J; ++j) {
          couplings[(b * J + j) * I + i] = c[j];
          for (int64_t d = 0; d < D; ++d) acc[j * D + d] += c[j] * row[j * D + d];
        }
      }
      std::copy(acc.begin(), acc.end(), s + b * J * D);
    }
  });
}

// One backward iteration: grad_c = votes . grad_s (+ extra); softmax backward over the classes,
// added to the running grad_logits; grad_v_prev = sum_i grad_logits * votes.
template <typename T>
void backward_pass(const T* votes, const T* couplings, const T* grad_s, const T* grad_c_extra,
                   T* grad_logits, T* grad_v_prev, int64_t B, int64_t I, int64_t J, int64_t D) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> gc(J), acc(J * D);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), T(0));
      const T* gs = grad_s + b * J * D;
      const T* c = couplings + b * J * I;
      T* gl = grad_logits + b * J * I;
      for (int64_t i = 0; i < I; ++i) {
        const T* row = votes + (i * B + b) * J * D;
        T weighted = 0;
        for (int64_t j = 0; j < J; ++j) {
          T dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += row[j * D + d] * gs[j * D + d];
          if (grad_c_extra) dot += grad_c_extra[(b * J + j) * I + i];
          gc[j] = dot;
          weighted += c[j * I + i] * dot;
        }
        for (int64_t j = 0; j < J; ++j) {
          T g = gl[j * I + i] + c[j * I + i] * (gc[j] - weighted);
          gl[j * I + i] = g;
          for (int64_t d = 0; d < D; ++d) acc[j * D + d] += g * row[j * D + d];
        }
      }
      std::copy(acc.begin(), acc.end(), grad_v_prev + b * J * D);
    }
  });
}

// grad_votes[i, b, j, :] = sum_k p_k[b, j, i] * q_k[b, j, :], written once in the votes' layout.
template <typename T>
void votes_grad(const std::vector<const T*>& p, const std::vector<const T*>& q, T* out, int64_t B,
                int64_t I, int64_t J, int64_t D) {
  const int64_t K = static_cast<int64_t>(p.size()), N = B * J;
  at::parallel_for(0, I, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t n = 0; n < N; ++n) {
        T* __restrict o = out + (i * N + n) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0;
        for (int64_t k = 0; k < K; ++k) {
          const T coef = p[k][n * I + i];
          const T* __restrict qk = q[k] + n * D;
          for (int64_t d = 0; d < D; ++d) o[d] += coef * qk[d];
        }
      }
    }
  });
}

void check(const torch::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == dims, name,
              " must be a contiguous CPU tensor of ", dims, " dims");
}

}  // namespace

// votes (I, B, J, D), v_prev (B, J, D), logits (B, J, I) updated in place.
// Returns (couplings (B, J, I), s (B, J, D) before the bias).
std::vector<torch::Tensor> route_forward(torch::Tensor votes, torch::Tensor v_prev,
                                         torch::Tensor logits, bool leaky) {
  check(votes, "votes", 4);
  check(v_prev, "v_prev", 3);
  check(logits, "logits", 3);
  const int64_t I = votes.size(0), B = votes.size(1), J = votes.size(2), D = votes.size(3);
  auto couplings = torch::empty({B, J, I}, votes.options());
  auto s = torch::empty({B, J, D}, votes.options());
  AT_DISPATCH_FLOATING_TYPES(votes.scalar_type(), "route_forward", [&] {
    forward_pass<scalar_t>(votes.data_ptr<scalar_t>(), v_prev.data_ptr<scalar_t>(),
                           logits.data_ptr<scalar_t>(), couplings.data_ptr<scalar_t>(),
                           s.data_ptr<scalar_t>(), B, I, J, D, leaky);
  });
  return {couplings, s};
}

// grad_logits (B, J, I) updated in place; grad_c_extra (B, J, I) or an empty tensor.
// Returns grad_v_prev (B, J, D).
torch::Tensor route_backward(torch::Tensor votes, torch::Tensor couplings, torch::Tensor grad_s,
                             torch::Tensor grad_c_extra, torch::Tensor grad_logits) {
  check(votes, "votes", 4);
  check(couplings, "couplings", 3);
  check(grad_s, "grad_s", 3);
  check(grad_logits, "grad_logits", 3);
  const bool extra = grad_c_extra.numel() > 0;
  if (extra) check(grad_c_extra, "grad_c_extra", 3);
  const int64_t I = votes.size(0), B = votes.size(1), J = votes.size(2), D = votes.size(3);
  auto grad_v_prev = torch::empty({B, J, D}, votes.options());
  AT_DISPATCH_FLOATING_TYPES(votes.scalar_type(), "route_backward", [&] {
    backward_pass<scalar_t>(votes.data_ptr<scalar_t>(), couplings.data_ptr<scalar_t>(),
                            grad_s.data_ptr<scalar_t>(),
                            extra ? grad_c_extra.data_ptr<scalar_t>() : nullptr,
                            grad_logits.data_ptr<scalar_t>(), grad_v_prev.data_ptr<scalar_t>(), B,
                            I, J, D);
  });
  return grad_v_prev;
}

// p: (B, J, I) coefficients, q: (B, J, D) factors. Returns grad_votes (I, B, J, D).
torch::Tensor route_votes_grad(std::vector<torch::Tensor> p, std::vector<torch::Tensor> q) {
  TORCH_CHECK(!p.empty() && p.size() == q.size(), "p and q need the same, non-zero length");
  const int64_t B = p[0].size(0), J = p[0].size(1), I = p[0].size(2), D = q[0].size(2);
  auto out = torch::empty({I, B, J, D}, p[0].options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "route_votes_grad", [&] {
    std::vector<const scalar_t*> pp, qq;
    for (size_t k = 0; k < p.size(); ++k) {
      check(p[k], "p", 3);
      check(q[k], "q", 3);
      pp.push_back(p[k].data_ptr<scalar_t>());
      qq.push_back(q[k].data_ptr<scalar_t>());
    }
    votes_grad<scalar_t>(pp, qq, out.data_ptr<scalar_t>(), B, I, J, D);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("route_forward", &route_forward, "one fused forward routing iteration");
  m.def("route_backward", &route_backward, "one fused backward routing iteration");
  m.def("route_votes_grad", &route_votes_grad, "the votes' gradient from its rank-1 terms");
}
