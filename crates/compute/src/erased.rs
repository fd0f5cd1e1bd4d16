//! A backend chosen at run time: [`Erased`] is a [`Backend`] over any other one, its values
//! boxed, so that one provider type serves whichever device the host picked (`--device`)
//! without making every type above it generic. The cost is one virtual call and a
//! downcast per op argument, nanoseconds against microseconds of kernel.

use std::any::Any;

use crate::{
    Activation, Attention, Backend, CacheShape, Error, GgmlType, Result, RopeParams, Shape,
    WeightData, WeightMeta,
};

/// A tensor, weight or KV cache of the backend inside an [`Erased`]; the three are
/// distinct types, so a handle table still tells them apart.
pub struct AnyTensor(Box<dyn Any + Send>);
pub struct AnyWeight(Box<dyn Any + Send>);
pub struct AnyCache(Box<dyn Any + Send>);

/// Any backend, behind one type.
pub struct Erased(Box<dyn DynBackend + Send>);

impl Erased {
    pub fn new<B: Backend + Send>(backend: B) -> Self {
        Self(Box::new(backend))
    }
}

fn foreign() -> Error {
    Error::InvalidArgument("a value of another backend".into())
}

/// Metadata of a weight that is not this backend's (never handed out in practice).
static NO_WEIGHT: WeightMeta = WeightMeta {
    ty: GgmlType::F32,
    dims: Vec::new(),
    values: None,
};

/// [`Backend`] with its values as `Any` (object-safe).
trait DynBackend {
    fn name(&self) -> &'static str;
    fn max_kv_elements(&self) -> u64;
    fn tensor(&self, cols: usize) -> AnyTensor;
    fn shape(&self, t: &AnyTensor) -> Shape;
    fn read_row(&self, t: &AnyTensor, row: usize) -> Result<Vec<f32>>;
    fn write(&self, t: &AnyTensor, rows: usize, data: Vec<f32>) -> Result<()>;
    fn weight(&self, w: WeightData) -> Result<AnyWeight>;
    fn weight_meta<'a>(&self, w: &'a AnyWeight) -> &'a WeightMeta;
    fn cache(&self, shape: CacheShape) -> AnyCache;
    fn cache_shape(&self, c: &AnyCache) -> CacheShape;
    fn cache_filled(&self, c: &AnyCache, layer: usize) -> usize;
    fn embed(&self, w: &AnyWeight, ids: &[u32], scale: f32, out: &AnyTensor) -> Result<()>;
    fn matmul(&self, x: &AnyTensor, w: &AnyWeight, out: &AnyTensor) -> Result<()>;
    fn rms_norm(&self, x: &AnyTensor, w: &AnyWeight, eps: f32, out: &AnyTensor) -> Result<()>;
    fn rope(&self, x: &AnyTensor, pos: u32, p: &RopeParams, f: Option<&[f32]>) -> Result<()>;
    fn attention(&self, a: Attention<'_, Erased>, out: &AnyTensor) -> Result<()>;
    fn glu(&self, gate: &AnyTensor, up: &AnyTensor, act: Activation) -> Result<()>;
    fn add(&self, acc: &AnyTensor, x: &AnyTensor) -> Result<()>;
    fn scale(&self, x: &AnyTensor, s: f32) -> Result<()>;
    fn scale_rows(&self, x: &AnyTensor, s: &[f32]) -> Result<()>;
    fn softmax(&self, x: &AnyTensor) -> Result<()>;
    fn keep_last_row(&self, x: &AnyTensor) -> Result<()>;
    fn rest(&self);
}

fn t<B: Backend>(t: &AnyTensor) -> Result<&B::Tensor> {
    t.0.downcast_ref().ok_or_else(foreign)
}

fn w<B: Backend>(w: &AnyWeight) -> Result<&B::Weight> {
    w.0.downcast_ref().ok_or_else(foreign)
}

impl<B: Backend> DynBackend for B {
    fn name(&self) -> &'static str {
        Backend::name(self)
    }

    fn max_kv_elements(&self) -> u64 {
        Backend::max_kv_elements(self)
    }

    fn tensor(&self, cols: usize) -> AnyTensor {
        AnyTensor(Box::new(Backend::tensor(self, cols)))
    }

    fn shape(&self, x: &AnyTensor) -> Shape {
        t::<B>(x).map_or(Shape { rows: 0, cols: 0 }, |x| Backend::shape(self, x))
    }

    fn read_row(&self, x: &AnyTensor, row: usize) -> Result<Vec<f32>> {
        Backend::read_row(self, t::<B>(x)?, row)
    }

    fn write(&self, x: &AnyTensor, rows: usize, data: Vec<f32>) -> Result<()> {
        Backend::write(self, t::<B>(x)?, rows, data)
    }

    fn weight(&self, data: WeightData) -> Result<AnyWeight> {
        Ok(AnyWeight(Box::new(Backend::weight(self, data)?)))
    }

    fn weight_meta<'a>(&self, x: &'a AnyWeight) -> &'a WeightMeta {
        w::<B>(x).map_or(&NO_WEIGHT, |x| Backend::weight_meta(self, x))
    }

    fn cache(&self, shape: CacheShape) -> AnyCache {
        AnyCache(Box::new(Backend::cache(self, shape)))
    }

    fn cache_shape(&self, c: &AnyCache) -> CacheShape {
        match c.0.downcast_ref::<B::Cache>() {
            Some(c) => Backend::cache_shape(self, c),
            None => CacheShape {
                n_layer: 0,
                n_ctx: 0,
                n_head_kv: 0,
                head_dim: 0,
            },
        }
    }

    fn cache_filled(&self, c: &AnyCache, layer: usize) -> usize {
        c.0.downcast_ref::<B::Cache>()
            .map_or(0, |c| Backend::cache_filled(self, c, layer))
    }

    fn embed(&self, table: &AnyWeight, ids: &[u32], scale: f32, out: &AnyTensor) -> Result<()> {
        Backend::embed(self, w::<B>(table)?, ids, scale, t::<B>(out)?)
    }

    fn matmul(&self, x: &AnyTensor, wt: &AnyWeight, out: &AnyTensor) -> Result<()> {
        Backend::matmul(self, t::<B>(x)?, w::<B>(wt)?, t::<B>(out)?)
    }

    fn rms_norm(&self, x: &AnyTensor, wt: &AnyWeight, eps: f32, out: &AnyTensor) -> Result<()> {
        Backend::rms_norm(self, t::<B>(x)?, w::<B>(wt)?, eps, t::<B>(out)?)
    }

    fn rope(&self, x: &AnyTensor, pos: u32, p: &RopeParams, f: Option<&[f32]>) -> Result<()> {
        Backend::rope(self, t::<B>(x)?, pos, p, f)
    }

    fn attention(&self, a: Attention<'_, Erased>, out: &AnyTensor) -> Result<()> {
        let a = Attention::<B> {
            q: t::<B>(a.q)?,
            k: t::<B>(a.k)?,
            v: t::<B>(a.v)?,
            cache: a.cache.0.downcast_ref().ok_or_else(foreign)?,
            layer: a.layer,
            pos: a.pos,
            n_head: a.n_head,
            scale: a.scale,
            window: a.window,
            softcap: a.softcap,
        };
        Backend::attention(self, a, t::<B>(out)?)
    }

    fn glu(&self, gate: &AnyTensor, up: &AnyTensor, act: Activation) -> Result<()> {
        Backend::glu(self, t::<B>(gate)?, t::<B>(up)?, act)
    }

    fn add(&self, acc: &AnyTensor, x: &AnyTensor) -> Result<()> {
        Backend::add(self, t::<B>(acc)?, t::<B>(x)?)
    }

    fn scale(&self, x: &AnyTensor, s: f32) -> Result<()> {
        Backend::scale(self, t::<B>(x)?, s)
    }

    fn scale_rows(&self, x: &AnyTensor, s: &[f32]) -> Result<()> {
        Backend::scale_rows(self, t::<B>(x)?, s)
    }

    fn softmax(&self, x: &AnyTensor) -> Result<()> {
        Backend::softmax(self, t::<B>(x)?)
    }

    fn keep_last_row(&self, x: &AnyTensor) -> Result<()> {
        Backend::keep_last_row(self, t::<B>(x)?)
    }

    fn rest(&self) {
        Backend::rest(self);
    }
}

impl Backend for Erased {
    type Tensor = AnyTensor;
    type Weight = AnyWeight;
    type Cache = AnyCache;

    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn max_kv_elements(&self) -> u64 {
        self.0.max_kv_elements()
    }

    fn tensor(&self, cols: usize) -> AnyTensor {
        self.0.tensor(cols)
    }

    fn shape(&self, t: &AnyTensor) -> Shape {
        self.0.shape(t)
    }

    fn read_row(&self, t: &AnyTensor, row: usize) -> Result<Vec<f32>> {
        self.0.read_row(t, row)
    }

    fn write(&self, t: &AnyTensor, rows: usize, data: Vec<f32>) -> Result<()> {
        self.0.write(t, rows, data)
    }

    fn weight(&self, w: WeightData) -> Result<AnyWeight> {
        self.0.weight(w)
    }

    fn weight_meta<'a>(&self, w: &'a AnyWeight) -> &'a WeightMeta {
        self.0.weight_meta(w)
    }

    fn cache(&self, shape: CacheShape) -> AnyCache {
        self.0.cache(shape)
    }

    fn cache_shape(&self, c: &AnyCache) -> CacheShape {
        self.0.cache_shape(c)
    }

    fn cache_filled(&self, c: &AnyCache, layer: usize) -> usize {
        self.0.cache_filled(c, layer)
    }

    fn embed(&self, w: &AnyWeight, ids: &[u32], scale: f32, out: &AnyTensor) -> Result<()> {
        self.0.embed(w, ids, scale, out)
    }

    fn matmul(&self, x: &AnyTensor, w: &AnyWeight, out: &AnyTensor) -> Result<()> {
        self.0.matmul(x, w, out)
    }

    fn rms_norm(&self, x: &AnyTensor, w: &AnyWeight, eps: f32, out: &AnyTensor) -> Result<()> {
        self.0.rms_norm(x, w, eps, out)
    }

    fn rope(&self, x: &AnyTensor, pos: u32, p: &RopeParams, f: Option<&[f32]>) -> Result<()> {
        self.0.rope(x, pos, p, f)
    }

    fn attention(&self, a: Attention<'_, Self>, out: &AnyTensor) -> Result<()> {
        self.0.attention(a, out)
    }

    fn glu(&self, gate: &AnyTensor, up: &AnyTensor, act: Activation) -> Result<()> {
        self.0.glu(gate, up, act)
    }

    fn add(&self, acc: &AnyTensor, x: &AnyTensor) -> Result<()> {
        self.0.add(acc, x)
    }

    fn scale(&self, x: &AnyTensor, s: f32) -> Result<()> {
        self.0.scale(x, s)
    }

    fn scale_rows(&self, x: &AnyTensor, s: &[f32]) -> Result<()> {
        self.0.scale_rows(x, s)
    }

    fn softmax(&self, x: &AnyTensor) -> Result<()> {
        self.0.softmax(x)
    }

    fn keep_last_row(&self, x: &AnyTensor) -> Result<()> {
        self.0.keep_last_row(x)
    }

    fn rest(&self) {
        self.0.rest();
    }
}
