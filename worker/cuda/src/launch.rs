//! Typed kernel launches: a [`Kernel`] is a kernel's name with the Rust types of its parameters,
//! so a launch with the wrong number, order or kind of arguments does not compile. The types
//! are declared once per kernel in [`crate::kernels`]; a test compiles the CUDA sources and
//! checks every declaration against the parameters NVRTC gives the kernel.

use crate::gpu::Gpu;
use anyhow::Result;
use cudarc::driver::sys as drv_sys;
use std::ffi::c_void;
use std::marker::PhantomData;

/// A device address passed as a C pointer parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ptr(pub u64);

/// A TMA map (`CUtensorMap`), passed to a kernel's `const __grid_constant__ TensorMap` by value.
#[derive(Clone, Copy, Debug)]
pub struct TensorMap(pub(crate) drv_sys::CUtensorMap);

/// How a parameter is passed, as far as the launch is concerned: 8 bytes (an address or a u64),
/// 4 bytes of integer, 4 bytes of float, or a 128-byte tensor map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ptr,
    U64,
    I32,
    F32,
    Map,
}

/// One kernel argument, held where the driver copies it from.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Word(u64),
    I32(i32),
    F32(f32),
    Map(drv_sys::CUtensorMap),
}

impl Arg {
    /// Where the driver copies the parameter from (as many bytes as the kernel's parameter has).
    pub(crate) fn payload(&mut self) -> *mut c_void {
        match self {
            Arg::Word(v) => v as *mut u64 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
            Arg::Map(m) => m as *mut drv_sys::CUtensorMap as *mut c_void,
        }
    }
}

/// A Rust type that stands for one kind of kernel parameter.
pub trait Param: Copy {
    const KIND: Kind;
    fn arg(self) -> Arg;
}

impl Param for Ptr {
    const KIND: Kind = Kind::Ptr;
    fn arg(self) -> Arg {
        Arg::Word(self.0)
    }
}
impl Param for u64 {
    const KIND: Kind = Kind::U64;
    fn arg(self) -> Arg {
        Arg::Word(self)
    }
}
impl Param for i32 {
    const KIND: Kind = Kind::I32;
    fn arg(self) -> Arg {
        Arg::I32(self)
    }
}
impl Param for f32 {
    const KIND: Kind = Kind::F32;
    fn arg(self) -> Arg {
        Arg::F32(self)
    }
}
impl Param for TensorMap {
    const KIND: Kind = Kind::Map;
    fn arg(self) -> Arg {
        Arg::Map(self.0)
    }
}

/// A kernel's whole argument list: a tuple of [`Param`]s.
pub trait Args {
    const KINDS: &'static [Kind];
    /// Calls `f` with the arguments laid out for the driver.
    fn with<Out>(self, f: impl FnOnce(&mut [Arg]) -> Out) -> Out;
}

/// One more argument after a tuple of them, or before it, for kernels whose parameters share a
/// run with another's: `(a, b).then(c)` is `(a, b, c)`, `(b, c).after(a)` is `(a, b, c)`.
pub trait Extend<X> {
    type Then;
    type After;
    fn then(self, x: X) -> Self::Then;
    fn after(self, x: X) -> Self::After;
}

macro_rules! tuple_args {
    () => {};
    ($T0:ident $v0:ident $(, $T:ident $v:ident)*) => {
        impl<$T0: Param $(, $T: Param)*> Args for ($T0, $($T,)*) {
            const KINDS: &'static [Kind] = &[$T0::KIND $(, $T::KIND)*];
            fn with<Out>(self, f: impl FnOnce(&mut [Arg]) -> Out) -> Out {
                let ($v0, $($v,)*) = self;
                f(&mut [$v0.arg() $(, $v.arg())*])
            }
        }
        impl<$T0: Param $(, $T: Param)*, X: Param> Extend<X> for ($T0, $($T,)*) {
            type Then = ($T0, $($T,)* X);
            type After = (X, $T0, $($T,)*);
            fn then(self, x: X) -> Self::Then {
                let ($v0, $($v,)*) = self;
                ($v0, $($v,)* x)
            }
            fn after(self, x: X) -> Self::After {
                let ($v0, $($v,)*) = self;
                (x, $v0, $($v,)*)
            }
        }
        tuple_args!($($T $v),*);
    };
}
tuple_args!(
    A a, B b, C c, D d, E e, F f, G g, H h, I i, J j, K k, L l, M m, N n, O o, P p, Q q, R r, S s, T t, U u,
    V v, W w, Y y
);

/// A kernel of the loaded families, with its parameters' types `A` (a tuple).
pub struct Kernel<A> {
    name: &'static str,
    params: PhantomData<fn(A)>,
}

impl<A> Clone for Kernel<A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<A> Copy for Kernel<A> {}

impl<A: Args> Kernel<A> {
    /// The kinds of its parameters, in order.
    pub const KINDS: &'static [Kind] = A::KINDS;

    /// Only [`crate::kernels`] declares kernels: a wrong parameter list would be undefined
    /// behaviour at launch.
    pub(crate) const fn new(name: &'static str) -> Self {
        Kernel {
            name,
            params: PhantomData,
        }
    }

    /// Launches it on the GPU's current stream; the return code is checked (asynchronous faults
    /// show at the next sync).
    pub fn launch(self, g: &Gpu, grid: (u32, u32, u32), block: u32, smem: u32, args: A) -> Result<()> {
        args.with(|args| g.launch_raw(self.name, grid, block, smem, args))
    }

    /// How many of its blocks of `block` threads and `smem` bytes of dynamic shared memory an SM
    /// holds at once (the driver's occupancy, registers included).
    pub fn resident_blocks(self, g: &Gpu, block: u32, smem: usize) -> Result<usize> {
        g.resident_blocks(self.name, block, smem)
    }

    /// A 1-D launch over `n` elements, 256 threads a block.
    pub fn launch_1d(self, g: &Gpu, n: usize, args: A) -> Result<()> {
        let blocks = n.div_ceil(256).max(1);
        self.launch(g, (blocks as u32, 1, 1), 256, 0, args)
    }
}

/// A device address as a pointer argument.
pub fn ptr(p: u64) -> Ptr {
    Ptr(p)
}

/// A size or count as an `int` argument (every size the kernels take fits in 31 bits).
pub fn int(v: usize) -> i32 {
    v as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_keep_their_order_and_kinds() {
        let args = (ptr(7), 2i32).after(1.5f32).then(9u64);
        assert_eq!(
            <(f32, Ptr, i32, u64) as Args>::KINDS,
            [Kind::F32, Kind::Ptr, Kind::I32, Kind::U64]
        );
        let laid = args.with(|a| {
            a.iter()
                .map(|arg| match arg {
                    Arg::Word(v) => format!("w{v}"),
                    Arg::I32(v) => format!("i{v}"),
                    Arg::F32(v) => format!("f{v}"),
                    Arg::Map(_) => "map".into(),
                })
                .collect::<Vec<_>>()
        });
        assert_eq!(laid, ["f1.5", "w7", "i2", "w9"]);
    }
}
