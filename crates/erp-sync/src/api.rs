//! The gRPC surface of erp-sync: `ErpSync` (status, on-demand pull and reconciliation, replay
//! of dead letters).

use std::time::Duration;

use mes_common::identity::Caller;
use mes_proto::v1 as pb;
use mes_proto::v1::erp_sync_server::ErpSync;
use tonic::{Request, Response, Status};

use crate::AppState;
use crate::breaker::State;
use crate::delivery::BREAKER_KEY;
use crate::error::Error;
use crate::pull::Trigger;
use crate::store::reconciliations::Report;
use crate::store::{self, inbound, outbound, reconciliations};

#[derive(Clone)]
pub struct Api {
    state: AppState,
}

impl Api {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

/// ERP sync control is for admins only.
fn require_admin<T>(req: &Request<T>) -> Result<Caller, Error> {
    match Caller::from_metadata(req.metadata()) {
        Some(c) if c.roles.iter().any(|r| r == "admin") => Ok(c),
        _ => Err(Error::PermissionDenied(
            "erp sync control requires the admin role".into(),
        )),
    }
}

use mes_domain::time::to_proto as timestamp;

fn reconciliation(report: Report) -> pb::Reconciliation {
    pb::Reconciliation {
        at: Some(timestamp(report.at)),
        differences: u32::try_from(report.differences.len()).unwrap_or(u32::MAX),
        details: report
            .differences
            .into_iter()
            .map(|d| pb::Difference {
                entity: d.entity,
                key: d.key,
                mes_quantity: d.mes_quantity.map(|q| q.to_string()).unwrap_or_default(),
                erp_quantity: d.erp_quantity.to_string(),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl ErpSync for Api {
    #[tracing::instrument(skip_all)]
    async fn get_status(
        &self,
        _req: Request<pb::GetErpStatusRequest>,
    ) -> Result<Response<pb::ErpStatus>, Status> {
        let pool = &self.state.pool;
        let last_pull = inbound::last_pulls(pool)
            .await
            .map_err(Error::from)?
            .into_iter()
            .map(|(entity, at)| (entity, timestamp(at)))
            .collect();
        let (depth, oldest) = outbound::depth(pool).await.map_err(Error::from)?;
        let dead_letters = inbound::dead_letter_count(pool)
            .await
            .map_err(Error::from)?;
        // The delivering replica records the breaker; this replica's own view otherwise.
        let breaker = match store::get_state(pool, BREAKER_KEY).await {
            Ok(Some(s)) => s,
            _ => self
                .state
                .breaker
                .lock()
                .map(|b| b.state())
                .unwrap_or(State::Closed)
                .as_str()
                .to_owned(),
        };
        let last_reconciliation = reconciliations::latest(pool)
            .await
            .map_err(Error::from)?
            .map(reconciliation);
        let timeout = Duration::from_millis(self.state.settings.erp.call_timeout_ms.max(1));
        let erp_reachable = match tokio::time::timeout(timeout, self.state.adapter.ping()).await {
            Ok(Ok(())) => "up",
            Ok(Err(e)) => {
                tracing::info!(error = %e, "erp ping failed");
                "down"
            }
            Err(_) => "down",
        };
        Ok(Response::new(pb::ErpStatus {
            adapter: self.state.adapter.name().to_owned(),
            last_pull,
            queue_depth: u64::try_from(depth).unwrap_or(0),
            oldest_pending_seconds: oldest,
            breaker,
            dead_letters: u64::try_from(dead_letters).unwrap_or(0),
            last_reconciliation,
            erp_reachable: erp_reachable.into(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn trigger_pull(
        &self,
        req: Request<pb::TriggerPullRequest>,
    ) -> Result<Response<pb::TriggerPullResponse>, Status> {
        let caller = require_admin(&req)?;
        tracing::info!(user = %caller.user, "pull requested");
        let report = self
            .state
            .puller
            .run(Trigger::Manual)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::TriggerPullResponse {
            started: true,
            upserted: report.total.upserted(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn reconcile(
        &self,
        req: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::Reconciliation>, Status> {
        let caller = require_admin(&req)?;
        tracing::info!(user = %caller.user, "reconciliation requested");
        let report = self
            .state
            .reconciler
            .run("manual")
            .await
            .map_err(Error::from)?;
        Ok(Response::new(reconciliation(report)))
    }

    #[tracing::instrument(skip_all)]
    async fn replay_dead_letters(
        &self,
        req: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        let caller = require_admin(&req)?;
        let r = req.into_inner();
        if !r.all && r.ids.is_empty() {
            return Err(
                Error::InvalidArgument("name dead letters in ids, or set all".into()).into(),
            );
        }
        let ids = (!r.all).then_some(r.ids.as_slice());
        let letters = inbound::unresolved_dead_letters(&self.state.pool, ids)
            .await
            .map_err(Error::from)?;
        let mut errors = Vec::new();
        if let Some(ids) = ids {
            let mut seen = std::collections::BTreeSet::new();
            for id in ids {
                if seen.insert(*id) && !letters.iter().any(|l| l.id == *id) {
                    errors.push(format!("dead letter {id}: unknown or resolved already"));
                }
            }
        }
        tracing::info!(user = %caller.user, letters = letters.len(), "dead letter replay requested");
        let report = self
            .state
            .puller
            .replay(letters, &caller.user)
            .await
            .map_err(Error::from)?;
        if report.requeued > 0 {
            self.state.outbox_wake.notify_one();
        }
        errors.extend(report.errors);
        Ok(Response::new(pb::ReplayDeadLettersResponse {
            replayed: report.replayed,
            still_failing: report.still_failing,
            errors,
        }))
    }
}
