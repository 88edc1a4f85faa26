//! Functions whose output size one argument chooses (`repeat`, `lpad`, `rpad`,
//! `array_repeat`, `array_resize`, `range`, `generate_series`), wrapped so that the size
//! they are about to build is checked before they allocate: `array_repeat(1, 1500000000)`
//! is an error naming the function, not an allocation that aborts the process. Constant
//! folding on the scheduler and tasks on executors call the same wrappers (sessions and task
//! contexts of both register them over DataFusion's built-ins by name).

use std::sync::Arc;

use datafusion::arrow::array::{Array, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::compute::kernels::length::length;
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::{Result, exec_err};
use datafusion::execution::{FunctionRegistry, SessionState};
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ExpressionPlacement, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature,
};

/// The most one call of a guarded function may build for one batch.
pub const MAX_OUTPUT_BYTES: u128 = 1 << 30;

/// How a guarded function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// Argument `count` copies of `unit` per row.
    Count { count: usize, unit: Unit },
    /// Integers from start to stop by step (`range`, `generate_series`), 8 bytes each.
    Range,
}

/// Bytes of one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Unit {
    Bytes(usize),
    /// The byte length of this argument's value in the row.
    LengthOf(usize),
    /// The memory of this argument's value in the row (on average over the batch).
    SizeOf(usize),
}

const GUARDED: [(&str, Growth); 7] = [
    (
        "repeat",
        Growth::Count {
            count: 1,
            unit: Unit::LengthOf(0),
        },
    ),
    (
        "lpad",
        Growth::Count {
            count: 1,
            unit: Unit::Bytes(4),
        },
    ),
    (
        "rpad",
        Growth::Count {
            count: 1,
            unit: Unit::Bytes(4),
        },
    ),
    (
        "array_repeat",
        Growth::Count {
            count: 1,
            unit: Unit::SizeOf(0),
        },
    ),
    (
        "array_resize",
        Growth::Count {
            count: 1,
            unit: Unit::Bytes(8),
        },
    ),
    ("range", Growth::Range),
    ("generate_series", Growth::Range),
];

/// Register the guarded functions over DataFusion's built-ins in `state`.
pub fn guard_functions(state: &mut SessionState) -> Result<()> {
    for (name, growth) in GUARDED {
        if let Some(inner) = state.scalar_functions().get(name).cloned() {
            let any: &dyn std::any::Any = inner.inner().as_ref();
            if any.is::<Guarded>() {
                continue;
            }
            state.register_udf(Arc::new(ScalarUDF::new_from_impl(Guarded {
                inner,
                growth,
            })))?;
        }
    }
    Ok(())
}

/// A built-in function with its output size checked before it runs.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Guarded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
}

/// Argument `v` as 64-bit integers, one per row; None when it is not an integer.
fn integers(v: &ColumnarValue, rows: usize) -> Result<Option<Int64Array>> {
    let array = v.to_array(rows)?;
    if !array.data_type().is_integer() {
        return Ok(None);
    }
    let array = cast(&array, &DataType::Int64)?;
    Ok(array.as_any().downcast_ref::<Int64Array>().cloned())
}

fn value(a: &Int64Array, i: usize) -> i64 {
    if i >= a.len() || a.is_null(i) {
        0
    } else {
        a.value(i)
    }
}

impl Guarded {
    /// About how many bytes the call would build (0 when it cannot tell).
    fn output_bytes(&self, args: &[ColumnarValue], rows: usize) -> Result<u128> {
        if rows == 0 {
            return Ok(0);
        }
        match self.growth {
            Growth::Count { count, unit } => {
                let Some(counts) = args.get(count).map(|c| integers(c, rows)).transpose()? else {
                    return Ok(0);
                };
                let Some(counts) = counts else {
                    return Ok(0);
                };
                let units: Vec<u128> = match unit {
                    Unit::Bytes(b) => vec![b as u128; rows],
                    Unit::LengthOf(i) => match args.get(i) {
                        // A constant's own length, not a copy of it per row.
                        Some(ColumnarValue::Scalar(scalar)) => {
                            let lengths = length(&scalar.to_array()?)?;
                            let one = integers(&ColumnarValue::Array(lengths), 1)?;
                            vec![one.map_or(0, |l| value(&l, 0).max(0) as u128); rows]
                        }
                        Some(arg) => {
                            let lengths = length(&arg.to_array(rows)?)?;
                            match integers(&ColumnarValue::Array(lengths), rows)? {
                                Some(l) => (0..rows).map(|r| value(&l, r).max(0) as u128).collect(),
                                None => vec![0; rows],
                            }
                        }
                        None => vec![0; rows],
                    },
                    Unit::SizeOf(i) => {
                        let size = match args.get(i) {
                            Some(ColumnarValue::Scalar(s)) => {
                                s.data_type().primitive_width().unwrap_or_else(|| s.size())
                            }
                            Some(ColumnarValue::Array(a)) => a.get_array_memory_size() / rows,
                            None => 0,
                        };
                        vec![size.max(8) as u128; rows]
                    }
                };
                Ok((0..rows.min(counts.len()))
                    .map(|r| value(&counts, r).max(0) as u128 * units[r])
                    .sum())
            }
            Growth::Range => {
                let ints: Vec<Option<Int64Array>> = args
                    .iter()
                    .map(|a| integers(a, rows))
                    .collect::<Result<_>>()?;
                let Some(ints) = ints.into_iter().collect::<Option<Vec<_>>>() else {
                    return Ok(0);
                };
                let at =
                    |k: usize, r: usize, default: i64| ints.get(k).map_or(default, |a| value(a, r));
                Ok((0..rows)
                    .map(|r| {
                        let (start, stop, step) = match ints.len() {
                            1 => (0, at(0, r, 0), 1),
                            _ => (at(0, r, 0), at(1, r, 0), at(2, r, 1)),
                        };
                        let span = (i128::from(stop) - i128::from(start)).unsigned_abs();
                        (span / i128::from(step).unsigned_abs().max(1) + 1) * 8
                    })
                    .sum())
            }
        }
    }
}

impl ScalarUDFImpl for Guarded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        let inner = self.inner.inner().with_updated_config(config)?;
        Some(ScalarUDF::new_from_impl(Guarded {
            inner: Arc::new(inner),
            growth: self.growth,
        }))
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let bytes = self.output_bytes(&args.args, args.number_rows)?;
        if bytes > MAX_OUTPUT_BYTES {
            return exec_err!(
                "{}() would build about {} MiB for a batch of {} rows, over the limit of {} MiB \
                 for one function call",
                self.name(),
                bytes >> 20,
                args.number_rows,
                MAX_OUTPUT_BYTES >> 20
            );
        }
        self.inner.invoke_with_args(args)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &Interval,
        inputs: &[&Interval],
    ) -> Result<Option<Vec<Interval>>> {
        self.inner.propagate_constraints(interval, inputs)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.inner().placement(args)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    async fn ctx() -> SessionContext {
        let mut state = datafusion::execution::SessionStateBuilder::new()
            .with_default_features()
            .build();
        guard_functions(&mut state).unwrap();
        SessionContext::new_with_state(state)
    }

    #[tokio::test]
    async fn ordinary_calls_answer_as_before() {
        let ctx = ctx().await;
        let batches = ctx
            .sql(
                "SELECT repeat('ab', 3), lpad('x', 4, '-'), cardinality(array_repeat(1, 1000)), \
                 cardinality(range(1, 11)), cardinality(generate_series(5))",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert!(
            text.contains("| ababab ") && text.contains("---x"),
            "{text}"
        );
        assert!(
            text.contains("| 1000 ") && text.contains("| 10 ") && text.contains("| 6 "),
            "{text}"
        );
    }

    #[tokio::test]
    async fn runaway_sizes_are_errors_naming_the_function() {
        let ctx = ctx().await;
        for (sql, name) in [
            (
                "SELECT cardinality(array_repeat(1, 1500000000))",
                "array_repeat",
            ),
            ("SELECT length(repeat('xy', 2000000000))", "repeat"),
            ("SELECT cardinality(range(0, 9000000000000))", "range"),
            ("SELECT length(lpad('a', 2147483647))", "lpad"),
            (
                "SELECT cardinality(array_repeat(1, x)) FROM (VALUES (1500000000)) t(x)",
                "array_repeat",
            ),
        ] {
            let result = match ctx.sql(sql).await {
                Ok(df) => df.collect().await.map(|_| ()),
                Err(e) => Err(e),
            };
            let err = result.expect_err(sql).to_string();
            assert!(
                err.contains(&format!("{name}() would build about")),
                "{sql}: {err}"
            );
        }
    }
}
