//! nftables transactions through libnftables (the library the `nft` command
//! is built on, Debian's `libnftables1`, loaded with `dlopen`) on one
//! context that lives as long as the proxy.
//!
//! Why not one `nft -f -` per transaction: when a transaction deletes
//! elements, the kernel frees them after an RCU grace period, and closing
//! the netlink socket waits for that (`nf_tables_trans_destroy_flush_work`).
//! Each `nft` process closes its socket on exit, so every endpoint change
//! that removed an element took 15-20 ms more on this machine than one that
//! only added. A context kept open pays that once, when the proxy goes.
//!
//! The context's netlink socket belongs to the network namespace of the
//! thread that opened it, whichever thread uses it later.
use std::ffi::{c_char, c_int, c_void, CStr, CString};

type New = unsafe extern "C" fn(u32) -> *mut c_void;
type Free = unsafe extern "C" fn(*mut c_void);
type Buffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type Run = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// One libnftables context.
pub struct Nft {
    lib: *mut c_void,
    ctx: *mut c_void,
    free: Free,
    get_error: GetBuffer,
    get_output: GetBuffer,
    run: Run,
}

// SAFETY: the context is only used through `&mut self` (one call at a time);
// libnftables keeps no thread-local state.
unsafe impl Send for Nft {}

impl Nft {
    /// A context in the calling thread's network namespace, or None when
    /// libnftables cannot be loaded (then run `nft`).
    pub fn open() -> Option<Nft> {
        // SAFETY: dlopen/dlsym with NUL-terminated names; every symbol is
        // cast to the signature libnftables(3) documents for it.
        unsafe {
            let lib = libc::dlopen(
                c"libnftables.so.1".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_LOCAL,
            );
            if lib.is_null() {
                return None;
            }
            let sym = |name: &CStr| {
                let p = libc::dlsym(lib, name.as_ptr());
                (!p.is_null()).then_some(p)
            };
            let (
                Some(new),
                Some(free),
                Some(buf_out),
                Some(buf_err),
                Some(get_error),
                Some(get_output),
                Some(run),
            ) = (
                sym(c"nft_ctx_new"),
                sym(c"nft_ctx_free"),
                sym(c"nft_ctx_buffer_output"),
                sym(c"nft_ctx_buffer_error"),
                sym(c"nft_ctx_get_error_buffer"),
                sym(c"nft_ctx_get_output_buffer"),
                sym(c"nft_run_cmd_from_buffer"),
            )
            else {
                libc::dlclose(lib);
                return None;
            };
            let new: New = std::mem::transmute::<*mut c_void, New>(new);
            let ctx = new(0);
            if ctx.is_null() {
                libc::dlclose(lib);
                return None;
            }
            // Output and errors into the context's buffers, not our stdout.
            std::mem::transmute::<*mut c_void, Buffer>(buf_out)(ctx);
            std::mem::transmute::<*mut c_void, Buffer>(buf_err)(ctx);
            Some(Nft {
                lib,
                ctx,
                free: std::mem::transmute::<*mut c_void, Free>(free),
                get_error: std::mem::transmute::<*mut c_void, GetBuffer>(get_error),
                get_output: std::mem::transmute::<*mut c_void, GetBuffer>(get_output),
                run: std::mem::transmute::<*mut c_void, Run>(run),
            })
        }
    }

    /// Run `script` as one transaction, as `nft -f` would; Err holds nft's
    /// message.
    pub fn run(&mut self, script: &str) -> Result<(), String> {
        let buf = CString::new(script).map_err(|_| "a NUL byte in the nft script".to_string())?;
        // SAFETY: a live context and a NUL-terminated buffer; the error
        // buffer is copied out before the next call can reuse it.
        unsafe {
            let r = (self.run)(self.ctx, buf.as_ptr());
            // Reading a buffer rewinds it: neither grows from call to call.
            (self.get_output)(self.ctx);
            let err = (self.get_error)(self.ctx);
            let msg = if err.is_null() {
                String::new()
            } else {
                CStr::from_ptr(err).to_string_lossy().trim().to_string()
            };
            if r == 0 {
                Ok(())
            } else if msg.is_empty() {
                Err(format!("libnftables: transaction failed ({r})"))
            } else {
                Err(msg)
            }
        }
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        // SAFETY: the context and library were opened by `open` and are
        // freed once.
        unsafe {
            (self.free)(self.ctx);
            libc::dlclose(self.lib);
        }
    }
}
