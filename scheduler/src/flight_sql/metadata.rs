//! The metadata Flight SQL clients and BI tools ask for first — catalogs, schemas, tables with
//! their Arrow schemas, table types, server facts (`GetSqlInfo`), the SQL types understood
//! (`GetXdbcTypeInfo`) — from the caller's session catalog (shared tables included). Volley
//! tables have no keys: the key commands answer with no rows.

use std::sync::Arc;

use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetTableTypes, CommandGetTables, Nullable,
    Searchable, SqlInfo, XdbcDataType,
};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::TableType;
use datafusion::prelude::SessionContext;
use tonic::Status;

fn arrow_status(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("building a metadata answer: {e}"))
}

/// The catalogs of session `ctx`.
pub(super) fn catalogs(
    ctx: &SessionContext,
    query: CommandGetCatalogs,
) -> Result<RecordBatch, Status> {
    let mut builder = query.into_builder();
    let mut names = ctx.catalog_names();
    names.sort();
    for name in names {
        builder.append(name);
    }
    builder.build().map_err(arrow_status)
}

/// The schemas of session `ctx`, filtered as asked.
pub(super) fn schemas(
    ctx: &SessionContext,
    query: CommandGetDbSchemas,
) -> Result<RecordBatch, Status> {
    let mut builder = query.into_builder();
    for catalog_name in ctx.catalog_names() {
        let Some(catalog) = ctx.catalog(&catalog_name) else {
            continue;
        };
        for schema_name in catalog.schema_names() {
            builder.append(&catalog_name, schema_name);
        }
    }
    builder.build().map_err(arrow_status)
}

/// The tables of session `ctx` (with their Arrow schemas when asked), filtered as asked.
pub(super) async fn tables(
    ctx: &SessionContext,
    query: CommandGetTables,
) -> Result<RecordBatch, Status> {
    let mut builder = query.into_builder();
    for catalog_name in ctx.catalog_names() {
        let Some(catalog) = ctx.catalog(&catalog_name) else {
            continue;
        };
        for schema_name in catalog.schema_names() {
            let Some(schema) = catalog.schema(&schema_name) else {
                continue;
            };
            for table_name in schema.table_names() {
                let Ok(Some(table)) = schema.table(&table_name).await else {
                    continue;
                };
                builder
                    .append(
                        &catalog_name,
                        &schema_name,
                        &table_name,
                        table_type(table.table_type()),
                        &with_type_names(&table.schema()),
                    )
                    .map_err(arrow_status)?;
            }
        }
    }
    builder.build().map_err(arrow_status)
}

/// `schema` with each column's SQL type name in the field metadata Flight SQL defines
/// (`ARROW:FLIGHT:SQL:TYPE_NAME`), which drivers report as the column's type name.
fn with_type_names(schema: &Schema) -> Schema {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|field| {
            let mut metadata = field.metadata().clone();
            metadata.insert(
                "ARROW:FLIGHT:SQL:TYPE_NAME".to_string(),
                sql_type_name(field.data_type()),
            );
            field.as_ref().clone().with_metadata(metadata)
        })
        .collect();
    Schema::new_with_metadata(fields, schema.metadata().clone())
}

/// The SQL name of an Arrow type in Volley's dialect.
fn sql_type_name(kind: &DataType) -> String {
    match kind {
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Int8 => "TINYINT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INTEGER".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::UInt8 => "TINYINT UNSIGNED".into(),
        DataType::UInt16 => "SMALLINT UNSIGNED".into(),
        DataType::UInt32 => "INTEGER UNSIGNED".into(),
        DataType::UInt64 => "BIGINT UNSIGNED".into(),
        DataType::Float16 | DataType::Float32 => "REAL".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => format!("DECIMAL({p}, {s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "VARCHAR".into(),
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => "BINARY".into(),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Time32(_) | DataType::Time64(_) => "TIME".into(),
        DataType::Timestamp(_, _) => "TIMESTAMP".into(),
        DataType::Interval(_) | DataType::Duration(_) => "INTERVAL".into(),
        other => other.to_string(),
    }
}

fn table_type(kind: TableType) -> &'static str {
    match kind {
        TableType::Base => "TABLE",
        TableType::View => "VIEW",
        TableType::Temporary => "LOCAL TEMPORARY",
    }
}

/// The table types tables are listed with.
pub(super) fn table_types(query: CommandGetTableTypes) -> Result<RecordBatch, Status> {
    let mut builder = query.into_builder();
    for kind in ["LOCAL TEMPORARY", "TABLE", "VIEW"] {
        builder.append(kind);
    }
    builder.build().map_err(arrow_status)
}

/// Keywords of the dialect beyond SQL-92's (what JDBC's `getSQLKeywords` reports).
const KEYWORDS: [&str; 8] = [
    "COPY", "EXPLAIN", "ANALYZE", "EXTERNAL", "STORED", "LOCATION", "CACHE", "UNCACHE",
];
const NUMERIC_FUNCTIONS: [&str; 10] = [
    "abs", "ceil", "floor", "round", "power", "sqrt", "ln", "log10", "exp", "trunc",
];
const STRING_FUNCTIONS: [&str; 10] = [
    "concat", "lower", "upper", "substr", "trim", "length", "replace", "lpad", "rpad", "strpos",
];
const DATETIME_FUNCTIONS: [&str; 6] = [
    "now",
    "current_date",
    "date_part",
    "date_trunc",
    "to_timestamp",
    "extract",
];

/// What the server is and supports.
pub(super) fn sql_info() -> Result<SqlInfoData, Status> {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "Volley");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    // The Arrow format version (Schema.fbs).
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    builder.append(SqlInfo::FlightSqlServerReadOnly, false);
    builder.append(SqlInfo::FlightSqlServerSql, true);
    builder.append(SqlInfo::FlightSqlServerSubstrait, false);
    builder.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    builder.append(SqlInfo::FlightSqlServerCancel, true);
    builder.append(SqlInfo::SqlDdlCatalog, false);
    builder.append(SqlInfo::SqlDdlSchema, false);
    builder.append(SqlInfo::SqlDdlTable, true);
    builder.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    // SqlSupportedCaseSensitivity: unquoted names fold to lower case (3); quoted ones are kept
    // as written, which the enum has no value for (0, unknown).
    builder.append(SqlInfo::SqlIdentifierCase, 3i32);
    builder.append(SqlInfo::SqlQuotedIdentifierCase, 0i32);
    builder.append(SqlInfo::SqlSearchStringEscape, "\\");
    builder.append(SqlInfo::SqlExtraNameCharacters, "");
    builder.append(SqlInfo::SqlSupportsColumnAliasing, true);
    builder.append(SqlInfo::SqlNullPlusNullIsNull, true);
    // Some JDBC tools read these lists unconditionally.
    builder.append(SqlInfo::SqlKeywords, &KEYWORDS[..]);
    builder.append(SqlInfo::SqlNumericFunctions, &NUMERIC_FUNCTIONS[..]);
    builder.append(SqlInfo::SqlStringFunctions, &STRING_FUNCTIONS[..]);
    builder.append(SqlInfo::SqlSystemFunctions, &[] as &[&str]);
    builder.append(SqlInfo::SqlDatetimeFunctions, &DATETIME_FUNCTIONS[..]);
    builder.build().map_err(arrow_status)
}

/// One SQL type as GetXdbcTypeInfo lists it.
fn xdbc(name: &str, kind: XdbcDataType, size: Option<i32>, quoted: bool) -> XdbcTypeInfo {
    XdbcTypeInfo {
        type_name: name.to_string(),
        data_type: kind,
        column_size: size,
        literal_prefix: quoted.then(|| "'".to_string()),
        literal_suffix: quoted.then(|| "'".to_string()),
        create_params: None,
        nullable: Nullable::NullabilityNullable,
        case_sensitive: quoted,
        searchable: Searchable::Full,
        unsigned_attribute: (!quoted).then_some(false),
        fixed_prec_scale: false,
        auto_increment: (!quoted).then_some(false),
        local_type_name: Some(name.to_string()),
        minimum_scale: None,
        maximum_scale: None,
        sql_data_type: kind,
        datetime_subcode: None,
        num_prec_radix: (!quoted).then_some(10),
        interval_precision: None,
    }
}

/// The SQL types Volley's dialect has.
pub(super) fn xdbc_types() -> Result<XdbcTypeInfoData, Status> {
    let mut builder = XdbcTypeInfoDataBuilder::new();
    for info in [
        xdbc("BOOLEAN", XdbcDataType::XdbcBit, Some(1), false),
        xdbc("TINYINT", XdbcDataType::XdbcTinyint, Some(3), false),
        xdbc("SMALLINT", XdbcDataType::XdbcSmallint, Some(5), false),
        xdbc("INTEGER", XdbcDataType::XdbcInteger, Some(10), false),
        xdbc("BIGINT", XdbcDataType::XdbcBigint, Some(19), false),
        xdbc("REAL", XdbcDataType::XdbcReal, Some(7), false),
        xdbc("DOUBLE", XdbcDataType::XdbcDouble, Some(15), false),
        xdbc("DECIMAL", XdbcDataType::XdbcDecimal, Some(38), false),
        xdbc("VARCHAR", XdbcDataType::XdbcVarchar, None, true),
        xdbc("BINARY", XdbcDataType::XdbcBinary, None, true),
        xdbc("DATE", XdbcDataType::XdbcDate, Some(10), true),
        xdbc("TIME", XdbcDataType::XdbcTime, None, true),
        xdbc("TIMESTAMP", XdbcDataType::XdbcTimestamp, None, true),
        xdbc("INTERVAL", XdbcDataType::XdbcInterval, None, true),
    ] {
        builder.append(info);
    }
    builder.build().map_err(arrow_status)
}

/// The columns of the GetPrimaryKeys answer.
pub(super) fn primary_keys_schema() -> SchemaRef {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("catalog_name", true),
        text("db_schema_name", true),
        text("table_name", false),
        text("column_name", false),
        text("key_name", true),
        Field::new("key_sequence", DataType::Int32, false),
    ]))
}

/// The columns of the GetExportedKeys / GetImportedKeys / GetCrossReference answers.
pub(super) fn foreign_keys_schema() -> SchemaRef {
    let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("pk_catalog_name", true),
        text("pk_db_schema_name", true),
        text("pk_table_name", false),
        text("pk_column_name", false),
        text("fk_catalog_name", true),
        text("fk_db_schema_name", true),
        text("fk_table_name", false),
        text("fk_column_name", false),
        Field::new("key_sequence", DataType::Int32, false),
        text("fk_key_name", true),
        text("pk_key_name", true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ]))
}
