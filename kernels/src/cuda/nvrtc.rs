//! The kernel sources and their compilation by NVRTC (at run time, once per device: no nvcc in
//! the build). A source that compiles with any warning is refused like one that does not
//! compile: the log must be empty.

use std::ffi::{c_char, CStr, CString};

use cudarc::nvrtc::{result, sys};

use super::CudaError;

/// Threads per thread block of every kernel; passed to NVRTC as `-DTHREADS`, so the sources and
/// the launches agree. A power of two (the reductions halve it).
pub(crate) const THREADS: u32 = 256;
/// Activation rows per thread block of the matmul kernels (`-DTOKENS`).
pub(crate) const TOKENS: u32 = 8;

/// One kernel source and the kernels the host loads from it.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// File name under `kernels/src/cuda/kernels/`.
    pub name: &'static str,
    pub code: &'static str,
    /// The `extern "C"` kernels the backend launches.
    pub kernels: &'static [&'static str],
}

pub(crate) const MATMUL: Source = Source {
    name: "matmul.cu",
    code: include_str!("kernels/matmul.cu"),
    kernels: &["matmul_f32", "matmul_f16", "matmul_bf16", "matmul_q8_0", "matmul_q4_0"],
};

pub(crate) const ELEMENTWISE: Source = Source {
    name: "elementwise.cu",
    code: include_str!("kernels/elementwise.cu"),
    kernels: &["silu_mul", "rms_norm", "softmax"],
};

/// Every kernel source.
pub const SOURCES: [Source; 2] = [MATMUL, ELEMENTWISE];

/// Whether the NVRTC library can be loaded (`libnvrtc.so` or `libnvrtc.so.13` on the loader's
/// path: `LD_LIBRARY_PATH`, the CUDA toolkit's `lib64` registered with `ldconfig`, ...). Every
/// other NVRTC call panics without it.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names, and closes it again.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are to live i32s.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

fn require_nvrtc() -> Result<(), CudaError> {
    match nvrtc_present() {
        true => Ok(()),
        false => Err(CudaError::NoNvrtc),
    }
}

/// The options every source is compiled with, for `arch` (`compute_90`: PTX, `sm_90`: a cubin).
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        format!("-DTHREADS={THREADS}"),
        format!("-DTOKENS={TOKENS}"),
    ]
}

/// Compiles `source` for `arch`: a virtual architecture (`compute_80`) gives PTX text, a real
/// one (`sm_80`) a cubin (NVRTC then also runs the PTX assembler, so inline assembly and
/// register limits are checked too). Any diagnostic in the log (a warning included) is an error.
pub fn compile(source: &Source, arch: &str) -> Result<Vec<u8>, CudaError> {
    require_nvrtc()?;
    let err =
        |what: &str, e: result::NvrtcError| CudaError::Nvrtc(format!("{what} ({}): {e:?}", source.name));
    let code = CString::new(source.code).expect("kernel sources have no NUL byte");
    let name = CString::new(source.name).expect("file names have no NUL byte");
    let prog = Program(result::create_program(&code, Some(&name)).map_err(|e| err("nvrtcCreateProgram", e))?);
    let options = options(arch);
    // SAFETY: `prog` was created above and is destroyed only by `Program`'s drop.
    let compiled = unsafe { result::compile_program(prog.0, &options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog.0) }.map_err(|e| err("nvrtcGetProgramLog", e))?;
    let log = c_text(&log);
    if compiled.is_err() || !log.trim().is_empty() {
        return Err(CudaError::Compile {
            file: source.name,
            arch: arch.to_string(),
            options: options.join(" "),
            log: if log.trim().is_empty() { format!("{compiled:?}") } else { log },
        });
    }
    if arch.starts_with("sm_") {
        prog.cubin().map_err(|e| err("nvrtcGetCUBIN", e))
    } else {
        // SAFETY: `prog` is live and compiled.
        let ptx = unsafe { result::get_ptx(prog.0) }.map_err(|e| err("nvrtcGetPTX", e))?;
        Ok(c_text(&ptx).into_bytes())
    }
}

/// A NUL-terminated buffer from NVRTC as text.
fn c_text(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// An NVRTC program, destroyed on drop (also on every error path).
struct Program(sys::nvrtcProgram);

impl Program {
    /// The cubin of a program compiled for a real architecture.
    fn cubin(&self) -> Result<Vec<u8>, result::NvrtcError> {
        let mut size = 0usize;
        // SAFETY: `self.0` is a live, compiled program; `size` is a live usize.
        unsafe { sys::nvrtcGetCUBINSize(self.0, &mut size) }.result()?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` has the `size` bytes NVRTC just reported for this program.
        unsafe { sys::nvrtcGetCUBIN(self.0, cubin.as_mut_ptr().cast()) }.result()?;
        Ok(cubin)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program`, destroyed only here. A failure to free it is
        // not worth a panic in drop.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}
