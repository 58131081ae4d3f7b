// Element-wise kernels over f32 activations: silu_mul, rms_norm and softmax, computed as the
// CPU reference (kernels/src/scalar.rs) writes them. The row kernels give one thread block of
// THREADS threads to a row: thread i takes columns i, i + THREADS, ..., and the partial results
// are combined in a fixed tree, so a row's result never depends on the other rows.
//
// No headers; THREADS is defined by the host (-D option) so that it matches the launch.

#ifndef THREADS
#error "THREADS (threads per block) must be defined by the host"
#endif

// The sum (max = false) or maximum (max = true) of every thread's `v`, in a fixed tree order;
// every thread gets it. `s` is THREADS floats of shared memory.
__device__ float block_reduce(float v, float* s, bool max) {
    const int tid = threadIdx.x;
    s[tid] = v;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride /= 2) {
        if (tid < stride) s[tid] = max ? fmaxf(s[tid], s[tid + stride]) : s[tid] + s[tid + stride];
        __syncthreads();
    }
    const float result = s[0];
    __syncthreads();
    return result;
}

// gate[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i].
extern "C" __global__ void silu_mul(float* gate, const float* up, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// Each of `rows` rows of x (cols each), in place: x * w / sqrt(mean(x^2) + eps).
extern "C" __global__ void rms_norm(float* x, const float* w, int rows, int cols, float eps) {
    __shared__ float s[THREADS];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        float* row = x + (size_t)r * cols;
        float sum = 0.0f;
        for (int c = threadIdx.x; c < cols; c += THREADS) sum += row[c] * row[c];
        const float ms = block_reduce(sum, s, false) / (float)cols;
        const float inv = 1.0f / sqrtf(ms + eps);
        for (int c = threadIdx.x; c < cols; c += THREADS) row[c] = row[c] * inv * w[c];
    }
}

// Softmax of each of `rows` rows of x (cols each), in place.
extern "C" __global__ void softmax(float* x, int rows, int cols) {
    __shared__ float s[THREADS];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        float* row = x + (size_t)r * cols;
        float m = __int_as_float(0xff800000);  // -infinity (no headers, so no INFINITY)
        for (int c = threadIdx.x; c < cols; c += THREADS) m = fmaxf(m, row[c]);
        m = block_reduce(m, s, true);
        float sum = 0.0f;
        for (int c = threadIdx.x; c < cols; c += THREADS) {
            const float e = expf(row[c] - m);
            row[c] = e;
            sum += e;
        }
        sum = block_reduce(sum, s, false);
        for (int c = threadIdx.x; c < cols; c += THREADS) row[c] /= sum;
    }
}
