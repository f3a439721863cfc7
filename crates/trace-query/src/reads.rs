//! The answers, each through the cache ([`crate::cache`]) with its database query
//! ([`crate::store::queries`]) behind it. Arguments are validated by the caller. An answer is
//! its protobuf encoding ([`Encoded`]): what the cache holds is what the API sends, never
//! decoded and encoded again on its way.

use std::marker::PhantomData;
use std::sync::Arc;

use fred::bytes::Bytes;
use mes_proto::v1 as pb;
use prost::Message;
use sqlx::PgPool;

use crate::cache::{Lookup, QueryCache, Slot};
use crate::domain::{Direction, GroupBy, Window};
use crate::error::Error;
use crate::stats::Query;
use crate::store::queries;

/// An answer of type `M`, encoded (as cached, or as just loaded and stored).
#[derive(Debug, Clone)]
pub struct Encoded<M> {
    bytes: Bytes,
    answer: PhantomData<fn() -> M>,
}

impl<M: Message + Default> Encoded<M> {
    fn new(bytes: Bytes) -> Self {
        Self {
            bytes,
            answer: PhantomData,
        }
    }

    /// The encoded message, as the API sends it.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// The answer itself.
    pub fn decode(&self) -> Result<M, Arc<Error>> {
        M::decode(self.bytes.as_ref()).map_err(|e| {
            Arc::new(Error::Internal(
                anyhow::Error::new(e).context("undecodable cached answer"),
            ))
        })
    }
}

fn encode<M: Message>(m: Option<M>) -> Option<Vec<u8>> {
    m.map(|m| m.encode_to_vec())
}

/// The genealogy of `lot` (validated arguments), through the cache.
pub async fn genealogy(
    cache: &QueryCache,
    pool: &PgPool,
    lot: &str,
    direction: Direction,
    depth: u32,
) -> Result<Encoded<pb::Genealogy>, Arc<Error>> {
    let (d, query) = match direction {
        Direction::Backward => ("b", Query::GenealogyBackward),
        Direction::Forward => ("f", Query::GenealogyForward),
    };
    let lookup = Lookup {
        query,
        slot: Slot::Field {
            key: cache.key(&format!("g:{d}:{lot}")),
            field: depth.to_string(),
        },
        negative: Some(cache.key(&format!("nf:lot:{lot}"))),
        filter_lot: Some(lot.to_owned()),
        flight: format!("g:{d}:{depth}:{lot}"),
        what: format!("lot {lot}"),
    };
    let (pool, lot) = (pool.clone(), lot.to_owned());
    let bytes = cache
        .fetch(lookup, move || async move {
            Ok(encode(
                queries::genealogy(&pool, &lot, direction, depth).await?,
            ))
        })
        .await?;
    Ok(Encoded::new(bytes))
}

pub async fn lot_history(
    cache: &QueryCache,
    pool: &PgPool,
    lot: &str,
) -> Result<Encoded<pb::LotHistory>, Arc<Error>> {
    let lookup = Lookup {
        query: Query::LotHistory,
        slot: Slot::Key(cache.key(&format!("h:{lot}"))),
        negative: Some(cache.key(&format!("nf:lot:{lot}"))),
        filter_lot: Some(lot.to_owned()),
        flight: format!("h:{lot}"),
        what: format!("lot {lot}"),
    };
    let (pool, lot) = (pool.clone(), lot.to_owned());
    let bytes = cache
        .fetch(lookup, move || async move {
            Ok(encode(queries::history(&pool, &lot).await?))
        })
        .await?;
    Ok(Encoded::new(bytes))
}

pub async fn work_order_summary(
    cache: &QueryCache,
    pool: &PgPool,
    work_order: &str,
) -> Result<Encoded<pb::WorkOrderSummary>, Arc<Error>> {
    let lookup = Lookup {
        query: Query::WorkOrderSummary,
        slot: Slot::Key(cache.key(&format!("wo:{work_order}"))),
        negative: Some(cache.key(&format!("nf:wo:{work_order}"))),
        filter_lot: None,
        flight: format!("wo:{work_order}"),
        what: format!("work order {work_order}"),
    };
    let (pool, wo) = (pool.clone(), work_order.to_owned());
    let bytes = cache
        .fetch(lookup, move || async move {
            Ok(encode(queries::work_order_summary(&pool, &wo).await?))
        })
        .await?;
    Ok(Encoded::new(bytes))
}

pub async fn production_report(
    cache: &QueryCache,
    pool: &PgPool,
    window: Window,
    group_by: GroupBy,
) -> Result<Encoded<pb::ProductionReport>, Arc<Error>> {
    let field = format!(
        "{}:{}:{}",
        group_by.as_str(),
        window.from.timestamp_nanos_opt().unwrap_or_default(),
        window.to.timestamp_nanos_opt().unwrap_or_default()
    );
    let lookup = Lookup {
        query: Query::ProductionReport,
        slot: Slot::Field {
            key: cache.key("reports"),
            field: field.clone(),
        },
        negative: None,
        filter_lot: None,
        flight: format!("r:{field}"),
        what: "report".into(),
    };
    let pool = pool.clone();
    let bytes = cache
        .fetch(lookup, move || async move {
            Ok(Some(
                queries::production_report(&pool, window, group_by)
                    .await?
                    .encode_to_vec(),
            ))
        })
        .await?;
    Ok(Encoded::new(bytes))
}
