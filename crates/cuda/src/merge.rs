//! The rules by which queued launches are merged (see the crate's documentation): pure
//! functions over a step's queue, so that their guards are tested without a GPU.

use cudarc::driver::LaunchConfig;

use super::{Arg, K, Launch};

/// Argument positions of a fused matvec launch (`matmul_q8_fused`, `matmul_q8k_fused`):
/// product i's weight, type, columns and output at 4i + (W, TY, N, Y) for i < 3 (N = 0:
/// none), then k, x, rows, the norm's weight (0: none), eps and output, and the add's
/// accumulator (0: none), the columns each warp computes, the GLU applied to products 0
/// (gate) and 1 (up) (-1: none; 0: SiLU, 1: GELU), then the RoPE folded in (`fold_rope`:
/// its table (0: none), position, head size, rotated values a head, key and value caches).
pub(crate) mod mv {
    pub const N: usize = 2;
    pub const Y: usize = 3;
    pub const K: usize = 12;
    pub const X: usize = 13;
    pub const ROWS: usize = 14;
    pub const NW: usize = 15;
    pub const EPS: usize = 16;
    pub const XO: usize = 17;
    pub const ACC: usize = 18;
    pub const CPW: usize = 19;
    pub const GLU: usize = 20;
    pub const RTAB: usize = 21;
    /// Arguments of a fused matvec launch.
    pub const ARGS: usize = 27;
}

/// A fused matvec's arguments after its GLU: no RoPE.
pub(crate) const NO_ROPE: [Arg; 6] = [
    Arg::P(0),
    Arg::P(0),
    Arg::I(0),
    Arg::I(0),
    Arg::P(0),
    Arg::P(0),
];

/// Queues a fused matvec (`matmul_q8_fused`, `matmul_q8k_fused`: arguments as [`mv`]
/// names them), merged with the launches around it where the result is the same:
/// - into the queued matvec before it when both read the same x (up to three products
///   in one launch: a layer's q, k and v, or its gate and up);
/// - taking over the RMS norm queued just before it whose output it reads (the norm's
///   output is still written, by the launch's first block).
pub(crate) fn push_matvec(
    launches: &mut Vec<Launch>,
    kind: K,
    cfg: LaunchConfig,
    mut args: Vec<Arg>,
) {
    if let Some(last) = launches.last_mut()
        && last.k == kind
        && last.smem == cfg.shared_mem_bytes
        && last.args[mv::K] == args[mv::K]
        && last.args[mv::ROWS] == args[mv::ROWS]
        && last.args[mv::CPW] == args[mv::CPW]
        && last.args[mv::ACC] == Arg::P(0)
        && last.args[mv::GLU] == Arg::I(-1)
    {
        let reads = if last.args[mv::NW] == Arg::P(0) {
            last.args[mv::X]
        } else {
            last.args[mv::XO]
        };
        let y = args[mv::Y];
        let free = (1..3).find(|&i| last.args[4 * i + mv::N] == Arg::I(0));
        let writes_again = (0..3).any(|i| last.args[4 * i + mv::Y] == y);
        if let Some(i) = free
            && reads == args[mv::X]
            && !writes_again
            && y != last.args[mv::X]
        {
            last.args[4 * i..4 * i + 4].copy_from_slice(&args[..4]);
            last.grid += cfg.grid_dim.0;
            return;
        }
    }
    if let Some(last) = launches.last()
        && last.k == K::RmsNorm
        // rms_norm's arguments: x, w, g, eps, o, groups.
        && last.args[4] == args[mv::X]
        && last.args[2] == args[mv::K]
        && last.args[5] == args[mv::ROWS]
        && last.args[0] != args[mv::Y]
    {
        args[mv::X] = last.args[0];
        args[mv::NW] = last.args[1];
        args[mv::EPS] = last.args[3];
        args[mv::XO] = last.args[4];
        launches.pop();
    }
    launches.push(Launch {
        k: kind,
        grid: cfg.grid_dim.0,
        block: cfg.block_dim.0,
        smem: cfg.shared_mem_bytes,
        args,
    });
}

/// Spreads a fused matvec launch whose blocks the GPU cannot hold at once (`resident`
/// blocks) over more columns a warp, so that it runs in one wave: a merged launch (a
/// layer's q, k and v) can need more blocks than each of its products alone, and a second
/// wave of a few blocks takes about as long as the first. Its grid is recomputed as the
/// kernels' `pick` divides it.
pub(crate) fn one_wave(l: &mut Launch, resident: u32) {
    // matmul_q8_fused takes columns four at a time, up to 32 a warp; matmul_q8k_fused any.
    let step = match l.k {
        K::MatmulQ8Fused => 4,
        K::MatmulQ8kFused => 1,
        _ => return,
    };
    let Arg::I(mut cpw) = l.args[mv::CPW] else {
        return;
    };
    let glu = l.args[mv::GLU] != Arg::I(-1);
    let warps = (l.block / 32).max(1) as i32;
    let ns = [0, 1, 2].map(|i| l.args[4 * i + mv::N]);
    let grid = |cpw: i32| -> u32 {
        (0..3)
            .map(|i| match ns[i] {
                // With a GLU, product 1 (up) is the same warps' second pass.
                Arg::I(n) if n > 0 && !(glu && i == 1) => (n as u32).div_ceil((warps * cpw) as u32),
                _ => 0,
            })
            .sum()
    };
    if cpw < 1 || grid(cpw) != l.grid {
        return;
    }
    while grid(cpw) > resident && cpw + step <= 32 {
        cpw += step;
    }
    l.args[mv::CPW] = Arg::I(cpw);
    l.grid = grid(cpw);
}

/// Folds `acc += x` into the queued matvec that made x, when it is the only product of
/// its launch and reads neither acc nor writes it otherwise.
pub(crate) fn fold_add(launches: &mut [Launch], acc: Arg, x: Arg, n: usize) -> bool {
    let Some(last) = launches.last_mut() else {
        return false;
    };
    if !matches!(last.k, K::MatmulQ8Fused | K::MatmulQ8kFused) {
        return false;
    }
    let single = last.args[mv::N + 4] == Arg::I(0);
    let (Arg::I(cols), Arg::I(rows)) = (last.args[mv::N], last.args[mv::ROWS]) else {
        return false;
    };
    let fold = single
        && last.args[mv::ACC] == Arg::P(0)
        && last.args[mv::Y] == x
        && cols as usize * rows as usize == n
        && acc != last.args[mv::X]
        && acc != last.args[mv::XO]
        && acc != x;
    if fold {
        last.args[mv::ACC] = acc;
    }
    fold
}

/// Folds `up = act(gate) · up` into the queued launch of the two products that made
/// gate and up (same type and width, nothing else merged): each warp then computes both
/// columns, a block for every `warps · cpw` columns of one of them.
pub(crate) fn fold_glu(launches: &mut [Launch], gate: Arg, up: Arg, n: usize, act: i32) -> bool {
    let Some(last) = launches.last_mut() else {
        return false;
    };
    if !matches!(last.k, K::MatmulQ8Fused | K::MatmulQ8kFused) {
        return false;
    }
    let (Arg::I(cols), Arg::I(rows)) = (last.args[mv::N], last.args[mv::ROWS]) else {
        return false;
    };
    let fold = last.args[mv::Y] == gate
        && last.args[4 + mv::Y] == up
        && last.args[4 + mv::N] == last.args[mv::N]
        && last.args[4 + 1] == last.args[1]
        && last.args[8 + mv::N] == Arg::I(0)
        && last.args[mv::ACC] == Arg::P(0)
        && last.args[mv::GLU] == Arg::I(-1)
        && cols as usize * rows as usize == n
        && last.grid.is_multiple_of(2);
    if fold {
        last.args[mv::GLU] = Arg::I(act);
        last.grid /= 2;
    }
    fold
}

/// Queues a RoPE launch (arguments as `rope` records them: x0, cols0, x1, cols1, rows,
/// head_dim, n_rot, neox, pos, table, v, kc, vc), as the second tensor of the RoPE launch
/// before it when that one has the same rows, parameters, position and table: a layer's
/// keys after its queries.
pub(crate) fn push_rope(launches: &mut Vec<Launch>, args: Vec<Arg>) {
    if let Some(last) = launches.last_mut()
        && last.k == K::Rope
        && last.args[2] == Arg::P(0)
        && last.args[4..10] == args[4..10]
        && last.args[0] != args[0]
    {
        last.args[2] = args[0];
        last.args[3] = args[1];
        last.grid = rope_grid(&last.args);
        return;
    }
    launches.push(Launch {
        k: K::Rope,
        grid: rope_grid(&args),
        block: 256,
        smem: 0,
        args,
    });
}

/// Folds kv_store (arguments: k, v, rows, width, pos, kc, vc) into the queued RoPE launch of
/// these keys when there is one: it stores them as it rotates them, and the values too.
pub(crate) fn fold_kv_store(launches: &mut [Launch], args: &[Arg]) -> bool {
    match launches.last_mut() {
        Some(last)
            if last.k == K::Rope
                && last.args[2] == args[0]
                && last.args[3] == args[3]
                && last.args[4] == args[2]
                && last.args[8] == args[4]
                && last.args[10] == Arg::P(0) =>
        {
            last.args[10] = args[1];
            last.args[11] = args[5];
            last.args[12] = args[6];
            last.grid = rope_grid(&last.args);
            true
        }
        _ => false,
    }
}

/// Folds the RoPE launch of a layer's queries and keys that also stores its keys and values
/// (after `fold_kv_store`) into the `matmul_q8_fused` launch before it that made exactly
/// those q, k and v (its three products, nothing else after them): normal mode only (the
/// pairs are adjacent columns, which one warp holds) and whole heads of an even size.
pub(crate) fn fold_rope(launches: &mut Vec<Launch>) -> bool {
    let [.., m, r] = launches.as_mut_slice() else {
        return false;
    };
    // rope's arguments: x0, cols0, x1, cols1, rows, head_dim, n_rot, neox, pos, table, v,
    // kc, vc.
    let a = &r.args;
    let int = |i: usize| match a.get(i) {
        Some(Arg::I(v)) if *v > 0 => *v as usize,
        _ => 0,
    };
    let (cols0, cols1, hd, n_rot) = (int(1), int(3), int(5), int(6));
    let p = &m.args;
    let fold = r.k == K::Rope
        && m.k == K::MatmulQ8Fused
        && p.len() == mv::ARGS
        && a.len() == 13
        && a[7] == Arg::I(0)
        && a[11] != Arg::P(0)
        && p[mv::Y] == a[0]
        && p[4 + mv::Y] == a[2]
        && p[8 + mv::Y] == a[10]
        && p[mv::N] == a[1]
        && p[4 + mv::N] == a[3]
        && p[8 + mv::N] == a[3]
        && p[mv::ROWS] == a[4]
        && p[mv::ACC] == Arg::P(0)
        && p[mv::GLU] == Arg::I(-1)
        && p[mv::RTAB] == Arg::P(0)
        && matches!(p[mv::CPW], Arg::I(c) if c % 4 == 0)
        && hd > 0
        && hd.is_multiple_of(2)
        && n_rot.is_multiple_of(2)
        && n_rot <= hd
        && cols0.is_multiple_of(hd)
        && cols1.is_multiple_of(hd);
    if fold {
        let rope = [a[9], a[8], a[5], a[6], a[11], a[12]];
        m.args[mv::RTAB..].copy_from_slice(&rope);
        launches.pop();
    }
    fold
}

/// Blocks of 256 threads for a `rope` launch's work (its arguments as `rope` records them):
/// the pairs of x0 and x1, and when it stores keys and values, x1's values past n_rot and
/// v's.
pub(crate) fn rope_grid(args: &[Arg]) -> u32 {
    let int = |i: usize| match args.get(i) {
        Some(Arg::I(v)) => (*v).max(0) as usize,
        _ => 0,
    };
    let (cols0, cols1, rows, hd, n_rot) = (int(1), int(3), int(4), int(5).max(1), int(6));
    let mut n = rows * (cols0 / hd + cols1 / hd) * (n_rot / 2);
    if args.get(11).is_some_and(|a| *a != Arg::P(0)) {
        n += rows * (cols1 / hd) * hd.saturating_sub(n_rot) + rows * cols1;
    }
    (n as u32).div_ceil(256).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: Arg = Arg::P(0);

    fn cfg(grid: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 1024,
        }
    }

    /// A decode matvec's arguments as `matmul` records them: x (k wide) times a weight of
    /// type `ty` into y (n wide), one column a warp.
    fn product(ty: i32, n: i32, y: u64, k: i32, x: u64) -> Vec<Arg> {
        let mut args = vec![Arg::P(0x9000 + y), Arg::I(ty), Arg::I(n), Arg::P(y)];
        args.extend([P0, Arg::I(0), Arg::I(0), P0].repeat(2));
        args.extend([Arg::I(k), Arg::P(x), Arg::I(1), P0, Arg::F(0), P0, P0]);
        args.extend([Arg::I(4), Arg::I(-1)]);
        args.extend(NO_ROPE);
        args
    }

    fn push(q: &mut Vec<Launch>, ty: i32, n: i32, y: u64, x: u64) {
        push_matvec(
            q,
            K::MatmulQ8Fused,
            cfg(n as u32 / 8),
            product(ty, n, y, 576, x),
        );
    }

    fn norm(q: &mut Vec<Launch>, x: u64, o: u64) {
        q.push(Launch {
            k: K::RmsNorm,
            grid: 1,
            block: 256,
            smem: 0,
            args: vec![
                Arg::P(x),
                Arg::P(0x7000),
                Arg::I(576),
                Arg::F(1e-5f32.to_bits()),
                Arg::P(o),
                Arg::I(1),
            ],
        });
    }

    #[test]
    fn a_norm_and_the_products_of_its_output_are_one_launch() {
        let mut q = Vec::new();
        norm(&mut q, 0x100, 0x200);
        push(&mut q, 3, 576, 0x300, 0x200);
        push(&mut q, 3, 192, 0x400, 0x200);
        push(&mut q, 3, 192, 0x500, 0x200);
        assert_eq!(q.len(), 1);
        let a = &q[0].args;
        assert_eq!(
            (a[mv::X], a[mv::NW], a[mv::XO]),
            (Arg::P(0x100), Arg::P(0x7000), Arg::P(0x200))
        );
        assert_eq!(
            [a[mv::N], a[4 + mv::N], a[8 + mv::N]],
            [Arg::I(576), Arg::I(192), Arg::I(192)]
        );
        assert_eq!(q[0].grid, 72 + 24 + 24);
        // A fourth product of the same input: a launch of its own.
        push(&mut q, 3, 192, 0x600, 0x200);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn launches_that_would_race_are_not_merged() {
        // A product writing the norm's input (its blocks would read what others write).
        let mut q = Vec::new();
        norm(&mut q, 0x100, 0x200);
        push(&mut q, 3, 576, 0x100, 0x200);
        assert_eq!(q.len(), 2);
        // A product of another product's output, and one writing the same output again.
        let mut q = Vec::new();
        push(&mut q, 3, 576, 0x300, 0x200);
        push(&mut q, 3, 576, 0x400, 0x300);
        push(&mut q, 3, 576, 0x400, 0x300);
        assert_eq!(q.len(), 3);
        // An add into the product's own input.
        let mut q = Vec::new();
        push(&mut q, 3, 576, 0x300, 0x200);
        assert!(!fold_add(&mut q, Arg::P(0x200), Arg::P(0x300), 576));
        // Of another size, or of another tensor.
        assert!(!fold_add(&mut q, Arg::P(0x800), Arg::P(0x300), 577));
        assert!(!fold_add(&mut q, Arg::P(0x800), Arg::P(0x900), 576));
        assert!(fold_add(&mut q, Arg::P(0x800), Arg::P(0x300), 576));
        assert_eq!(q[0].args[mv::ACC], Arg::P(0x800));
        // Nothing merges into a launch with its add.
        push(&mut q, 3, 576, 0x400, 0x200);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn a_merged_launch_too_large_for_one_wave_takes_more_columns_a_warp() {
        // A 1B model's q, k and v (K-quant, one column a warp, 8 warps a block): 384
        // blocks, where an H200 holds 264 fused matvec blocks at once.
        let mut q = Vec::new();
        for (n, y) in [(2048, 0x300), (512, 0x400), (512, 0x500)] {
            let mut args = product(12, n, y, 2048, 0x200);
            args[mv::CPW] = Arg::I(1);
            push_matvec(&mut q, K::MatmulQ8kFused, cfg(n as u32 / 8), args);
        }
        assert_eq!((q.len(), q[0].grid), (1, 384));
        one_wave(&mut q[0], 264);
        assert_eq!((q[0].args[mv::CPW], q[0].grid), (Arg::I(2), 128 + 32 + 32));
        // Already one wave: unchanged.
        one_wave(&mut q[0], 264);
        assert_eq!((q[0].args[mv::CPW], q[0].grid), (Arg::I(2), 192));
        // A GLU launch counts the gate's blocks only (up is the same warps' second pass);
        // matmul_q8_fused's columns go four at a time.
        let mut q = Vec::new();
        for y in [0x300, 0x400] {
            push_matvec(
                &mut q,
                K::MatmulQ8Fused,
                cfg(128),
                product(3, 4096, y, 576, 0x200),
            );
        }
        assert!(fold_glu(&mut q, Arg::P(0x300), Arg::P(0x400), 4096, 0));
        assert_eq!(q[0].grid, 128);
        one_wave(&mut q[0], 100);
        assert_eq!((q[0].args[mv::CPW], q[0].grid), (Arg::I(8), 64));
        // A launch whose grid is not pick's (not made by `matmul`): left alone.
        let mut q = Vec::new();
        push(&mut q, 3, 576, 0x300, 0x200);
        let before = (q[0].args[mv::CPW], q[0].grid);
        one_wave(&mut q[0], 1);
        assert_eq!((q[0].args[mv::CPW], q[0].grid), before);
    }

    #[test]
    fn the_glu_joins_its_gate_and_up_products() {
        let mut q = Vec::new();
        push(&mut q, 3, 1536, 0x300, 0x200);
        push(&mut q, 3, 1536, 0x400, 0x200);
        assert_eq!((q.len(), q[0].grid), (1, 384));
        // Not with the operands swapped, nor of another size.
        assert!(!fold_glu(&mut q, Arg::P(0x400), Arg::P(0x300), 1536, 0));
        assert!(!fold_glu(&mut q, Arg::P(0x300), Arg::P(0x400), 1535, 0));
        assert!(fold_glu(&mut q, Arg::P(0x300), Arg::P(0x400), 1536, 1));
        assert_eq!((q[0].args[mv::GLU], q[0].grid), (Arg::I(1), 192));
        push(&mut q, 3, 1536, 0x500, 0x200);
        assert_eq!(q.len(), 2, "nothing merges into a GLU launch");
        // Gate and up of different types: each warp's two columns would need two kernels.
        let mut q = Vec::new();
        push(&mut q, 3, 1536, 0x300, 0x200);
        push(&mut q, 2, 1536, 0x400, 0x200);
        assert!(!fold_glu(&mut q, Arg::P(0x300), Arg::P(0x400), 1536, 0));
    }

    fn rope(x: u64, cols: i32, pos: u64) -> Vec<Arg> {
        let mut args = vec![
            Arg::P(x),
            Arg::I(cols),
            P0,
            Arg::I(0),
            Arg::I(1),
            Arg::I(64),
        ];
        args.extend([
            Arg::I(64),
            Arg::I(1),
            Arg::P(pos),
            Arg::P(0x5000),
            P0,
            P0,
            P0,
        ]);
        args
    }

    #[test]
    fn rope_of_q_and_k_stores_the_keys_and_values() {
        let mut q = Vec::new();
        push_rope(&mut q, rope(0x100, 576, 0x40));
        assert_eq!(q[0].grid, 2, "9 heads × 32 pairs: 288 threads");
        push_rope(&mut q, rope(0x200, 192, 0x40));
        assert_eq!((q.len(), q[0].args[2], q[0].grid), (1, Arg::P(0x200), 2));
        let store = |k: u64, width: i32, pos: u64| {
            [
                Arg::P(k),
                Arg::P(0x300),
                Arg::I(1),
                Arg::I(width),
                Arg::P(pos),
                Arg::P(0x6000),
                Arg::P(0x6800),
            ]
        };
        // Not another tensor's keys, another width or another position.
        assert!(!fold_kv_store(&mut q, &store(0x100, 192, 0x40)));
        assert!(!fold_kv_store(&mut q, &store(0x200, 576, 0x40)));
        assert!(!fold_kv_store(&mut q, &store(0x200, 192, 0x44)));
        assert!(fold_kv_store(&mut q, &store(0x200, 192, 0x40)));
        assert_eq!(
            &q[0].args[10..],
            &[Arg::P(0x300), Arg::P(0x6000), Arg::P(0x6800)]
        );
        // 288 + 96 pairs and 192 values: 576 threads.
        assert_eq!(q[0].grid, 3);
        assert!(
            !fold_kv_store(&mut q, &store(0x200, 192, 0x40)),
            "stored once"
        );
        // Another position: a launch of its own.
        push_rope(&mut q, rope(0x400, 576, 0x44));
        assert_eq!(q.len(), 2);
    }

    /// A RoPE launch with its kv store, after the q/k/v product of a layer.
    fn qkv_then_rope(neox: i32) -> Vec<Launch> {
        let mut q = Vec::new();
        push(&mut q, 3, 576, 0x10, 0x1);
        push(&mut q, 3, 192, 0x20, 0x1);
        push(&mut q, 3, 192, 0x30, 0x1);
        // `rope`'s launches (NeoX) in the mode asked for.
        let mode = |mut args: Vec<Arg>| {
            args[7] = Arg::I(neox);
            args
        };
        push_rope(&mut q, mode(rope(0x10, 576, 0x500)));
        push_rope(&mut q, mode(rope(0x20, 192, 0x500)));
        let pos = Arg::P(0x500);
        let store = [
            Arg::P(0x20),
            Arg::P(0x30),
            Arg::I(1),
            Arg::I(192),
            pos,
            Arg::P(0x700),
            Arg::P(0x800),
        ];
        assert!(fold_kv_store(&mut q, &store));
        q
    }

    #[test]
    fn normal_mode_rope_is_folded_into_the_qkv_product() {
        let mut q = qkv_then_rope(0);
        assert_eq!(q.len(), 2);
        assert!(fold_rope(&mut q));
        assert_eq!(q.len(), 1);
        let rope = &q[0].args[mv::RTAB..];
        assert_eq!(
            rope,
            [
                Arg::P(0x5000),
                Arg::P(0x500),
                Arg::I(64),
                Arg::I(64),
                Arg::P(0x700),
                Arg::P(0x800)
            ]
        );
        // NeoX pairs are half a head apart (other warps): not folded.
        let mut q = qkv_then_rope(1);
        assert!(!fold_rope(&mut q));
        assert_eq!(q.len(), 2);
        // A RoPE of other tensors than the product's: not folded.
        let mut q = qkv_then_rope(0);
        q[1].args[0] = Arg::P(0x99);
        assert!(!fold_rope(&mut q));
    }
}
