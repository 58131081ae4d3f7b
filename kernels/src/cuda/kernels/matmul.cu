// Matrix products against weights in their stored format: out[t, r] = sum_c x[t, c] * w[r, c]
// (x: n rows of `cols` f32 activations; w: `rows` rows of `cols` weights, laid out as
// stevedore's `Weight`: row-major, little-endian; out: n rows of `rows` f32).
//
// One thread block computes one weight row against up to TOKENS activation rows. Thread i
// accumulates, in f32, columns i, i + THREADS, i + 2 THREADS, ... (for a block format: whole
// blocks i, i + THREADS, ...), each token in its own accumulator; the THREADS partial sums of a
// token are then added in a fixed tree. Every (row, token) result is therefore the same sequence
// of operations whatever n is and whichever other tokens share the thread block: batched equals
// alone.
//
// Block formats are ggml's (kernels/src/quant.rs): q8_0 is per 32 weights an f16 scale d and 32
// signed bytes q, w = d q (34 bytes); q4_0 is an f16 scale d and 16 bytes, weight j in the low
// nibble of byte j and weight j + 16 in its high nibble, w = d (q - 8) (18 bytes). Unlike the CPU
// path, the activations stay f32 (the CPU quantizes them to q8_0): a block contributes
// d * sum_j x_j q_j.
//
// No headers: bf16 and f16 are converted by hand, so the kernels compile with NVRTC alone.
// THREADS and TOKENS are defined by the host (-D options) so that they match the launch.

#ifndef THREADS
#error "THREADS (threads per block) must be defined by the host"
#endif
#ifndef TOKENS
#error "TOKENS (activation rows per block) must be defined by the host"
#endif

#define QK 32

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// The f16 scale at the start of a block (block formats are byte-aligned only).
__device__ __forceinline__ float block_scale(const unsigned char* blk) {
    return f16_to_f32((unsigned short)(blk[0] | (blk[1] << 8)));
}

// Weight formats, as the host names them.
enum Format { F32, F16, BF16, Q8_0, Q4_0 };

// Element c of a row of a plain format (rows of a device allocation are element-aligned).
template <Format FMT>
__device__ __forceinline__ float plain_at(const unsigned char* row, int c) {
    if constexpr (FMT == F32) {
        return reinterpret_cast<const float*>(row)[c];
    } else if constexpr (FMT == F16) {
        return f16_to_f32(reinterpret_cast<const unsigned short*>(row)[c]);
    } else {
        return bf16_to_f32(reinterpret_cast<const unsigned short*>(row)[c]);
    }
}

// The 32 weights of block `blk`, dequantized but for the scale (q, or q - 8), in element order.
template <Format FMT>
__device__ __forceinline__ void block_codes(const unsigned char* blk, float (&q)[QK]) {
    if constexpr (FMT == Q8_0) {
        for (int j = 0; j < QK; j++) q[j] = (float)(signed char)blk[2 + j];
    } else {
        for (int j = 0; j < QK / 2; j++) {
            q[j] = (float)((int)(blk[2 + j] & 0x0F) - 8);
            q[j + QK / 2] = (float)((int)(blk[2 + j] >> 4) - 8);
        }
    }
}

template <Format FMT>
__device__ void matmul(const unsigned char* __restrict__ w, const float* __restrict__ x,
                       float* __restrict__ out, int rows, int cols, int n) {
    __shared__ float partial[TOKENS][THREADS];
    const int tid = threadIdx.x;
    const int r = blockIdx.x;
    const bool block_format = FMT == Q8_0 || FMT == Q4_0;
    const size_t block_bytes = FMT == Q8_0 ? 2 + QK : FMT == Q4_0 ? 2 + QK / 2 : 0;
    const size_t row_bytes = block_format ? (size_t)(cols / QK) * block_bytes
                                          : (size_t)cols * (FMT == F32 ? 4 : 2);
    const unsigned char* row = w + (size_t)r * row_bytes;

    for (int t0 = blockIdx.y * TOKENS; t0 < n; t0 += gridDim.y * TOKENS) {
        const int nt = min(TOKENS, n - t0);
        float acc[TOKENS];
        for (int t = 0; t < TOKENS; t++) acc[t] = 0.0f;

        if constexpr (FMT == Q8_0 || FMT == Q4_0) {
            for (int b = tid; b < cols / QK; b += THREADS) {
                const unsigned char* blk = row + (size_t)b * block_bytes;
                const float d = block_scale(blk);
                float q[QK];
                block_codes<FMT>(blk, q);
                for (int t = 0; t < TOKENS; t++) {
                    if (t < nt) {
                        const float* xt = x + (size_t)(t0 + t) * cols + (size_t)b * QK;
                        float s = 0.0f;
                        for (int j = 0; j < QK; j++) s += xt[j] * q[j];
                        acc[t] += d * s;
                    }
                }
            }
        } else {
            for (int c = tid; c < cols; c += THREADS) {
                const float wc = plain_at<FMT>(row, c);
                for (int t = 0; t < TOKENS; t++) {
                    if (t < nt) acc[t] += x[(size_t)(t0 + t) * cols + c] * wc;
                }
            }
        }

        for (int t = 0; t < TOKENS; t++) partial[t][tid] = acc[t];
        __syncthreads();
        for (int stride = THREADS / 2; stride > 0; stride /= 2) {
            if (tid < stride) {
                for (int t = 0; t < TOKENS; t++) partial[t][tid] += partial[t][tid + stride];
            }
            __syncthreads();
        }
        if (tid == 0) {
            for (int t = 0; t < nt; t++) out[(size_t)(t0 + t) * rows + r] = partial[t][0];
        }
        __syncthreads();
    }
}

extern "C" __global__ void matmul_f32(const unsigned char* w, const float* x, float* out, int rows, int cols, int n) {
    matmul<F32>(w, x, out, rows, cols, n);
}
extern "C" __global__ void matmul_f16(const unsigned char* w, const float* x, float* out, int rows, int cols, int n) {
    matmul<F16>(w, x, out, rows, cols, n);
}
extern "C" __global__ void matmul_bf16(const unsigned char* w, const float* x, float* out, int rows, int cols, int n) {
    matmul<BF16>(w, x, out, rows, cols, n);
}
extern "C" __global__ void matmul_q8_0(const unsigned char* w, const float* x, float* out, int rows, int cols, int n) {
    matmul<Q8_0>(w, x, out, rows, cols, n);
}
extern "C" __global__ void matmul_q4_0(const unsigned char* w, const float* x, float* out, int rows, int cols, int n) {
    matmul<Q4_0>(w, x, out, rows, cols, n);
}
