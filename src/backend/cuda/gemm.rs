//! Matrix products through cuBLASLt: bf16 inputs and output, f32 accumulation and scaling.
//! The algorithm for each shape is chosen once by cuBLASLt's heuristic and kept.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

/// Scratch memory cuBLASLt may use (32 MiB is what NVIDIA recommends for Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// `y[n, m] (+)= x[n, k] · w[m, k]ᵀ (+ bias[m])`, row-major: a linear layer over n tokens.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Shape {
    /// Output features.
    pub m: u64,
    /// Tokens.
    pub n: u64,
    /// Input features.
    pub k: u64,
    pub bias: bool,
    /// Add the product to what `y` holds (residual connection) instead of overwriting it.
    pub accumulate: bool,
}

/// Device pointers of one product.
pub struct Operands {
    pub y: u64,
    pub x: u64,
    pub w: u64,
    pub bias: Option<u64>,
}

/// Descriptors and the chosen algorithm for one shape.
struct GemmPlan {
    desc: sys::cublasLtMatmulDesc_t,
    w_layout: sys::cublasLtMatrixLayout_t,
    x_layout: sys::cublasLtMatrixLayout_t,
    y_layout: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for GemmPlan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by this plan and is destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.w_layout);
            let _ = lt::destroy_matrix_layout(self.x_layout);
            let _ = lt::destroy_matrix_layout(self.y_layout);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    plans: RefCell<HashMap<Shape, GemmPlan>>,
}

impl Gemm {
    pub fn new() -> Result<Gemm, String> {
        let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e:?}"))?;
        Ok(Gemm {
            handle,
            plans: RefCell::new(HashMap::new()),
        })
    }

    /// Enqueue the product on `stream`. `workspace` holds [`WORKSPACE_BYTES`].
    ///
    /// # Safety
    /// The pointers must hold the sizes `shape` implies, live until the stream has run the
    /// product, and `workspace` must not be used by anything else on another stream.
    pub unsafe fn matmul(
        &self,
        shape: Shape,
        ops: &Operands,
        workspace: u64,
        stream: *mut c_void,
    ) -> Result<(), String> {
        let mut plans = self.plans.borrow_mut();
        let plan = match plans.entry(shape) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(shape)?),
        };
        if let Some(bias) = ops.bias {
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as *const c_void,
                size_of::<u64>(),
            )
            .map_err(|e| format!("cuBLASLt bias pointer: {e:?}"))?;
        }
        let alpha = 1f32;
        let beta = if shape.accumulate { 1f32 } else { 0f32 };
        lt::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            ops.w as *const c_void,
            plan.w_layout,
            ops.x as *const c_void,
            plan.x_layout,
            ops.y as *const c_void,
            plan.y_layout,
            ops.y as *mut c_void,
            plan.y_layout,
            &plan.algo,
            workspace as *mut c_void,
            WORKSPACE_BYTES,
            stream as sys::cudaStream_t,
        )
        .map_err(|e| format!("cublasLtMatmul {shape:?}: {e:?}"))
    }

    /// Column-major view: y (m×n, ld m) = op(w) (m×k) · x (k×n), where w is stored k×m
    /// (ld k) and transposed: the "TN" layout cuBLASLt runs fastest.
    fn plan(&self, s: Shape) -> Result<GemmPlan, String> {
        let err = |what: &'static str| {
            move |e: lt::CublasError| format!("cuBLASLt {what} for {s:?}: {e:?}")
        };
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(err("matmul descriptor"))?;
        let w_layout =
            lt::create_matrix_layout(bf16, s.k, s.m, s.k as i64).map_err(err("layout of w"))?;
        let x_layout =
            lt::create_matrix_layout(bf16, s.k, s.n, s.k as i64).map_err(err("layout of x"))?;
        let y_layout =
            lt::create_matrix_layout(bf16, s.m, s.n, s.m as i64).map_err(err("layout of y"))?;
        let mut plan = GemmPlan {
            desc,
            w_layout,
            x_layout,
            y_layout,
            algo: unsafe { std::mem::zeroed() },
        };
        // SAFETY: the descriptors are live; attribute values are read during the call.
        unsafe {
            let transpose: i32 = 1; // CUBLAS_OP_T
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &transpose as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .map_err(err("transpose"))?;
            if s.bias {
                let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epilogue as *const _ as *const c_void,
                    size_of::<sys::cublasLtEpilogue_t>(),
                )
                .map_err(err("bias epilogue"))?;
            }
            let pref = lt::create_matmul_pref().map_err(err("preference"))?;
            let ws = WORKSPACE_BYTES as u64;
            let found = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                size_of::<u64>(),
            )
            .and_then(|()| {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    desc,
                    w_layout,
                    x_layout,
                    y_layout,
                    y_layout,
                    pref,
                )
            });
            let _ = lt::destroy_matmul_pref(pref);
            plan.algo = found.map_err(err("algorithm choice"))?.algo;
        }
        Ok(plan)
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.borrow_mut().clear();
        // SAFETY: the handle was created in `new` and every plan using it is gone.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
