//! Webhook delivery: one worker per configured URL tails the event log from its cursor (kept in
//! the registry, so a restart neither loses nor repeats a delivered event) and POSTs each event
//! as JSON, retrying with exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use algolink_registry::{Event, EventFilter};

use crate::config::Webhook;
use crate::state::AppState;

/// Runs until `shutdown` fires.
pub async fn run(state: Arc<AppState>, hook: Webhook, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let client = match reqwest::Client::builder().timeout(Duration::from_millis(hook.timeout_ms)).build() {
        Ok(c) => c,
        Err(e) => return tracing::error!(url = %hook.url, "webhook client: {e}"),
    };
    // A new webhook starts with the events that come after it was configured.
    let mut cursor = match state.registry.webhook_cursor(&hook.url).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            let last = state.registry.last_event_id().await.unwrap_or(0);
            let _ = state.registry.set_webhook_cursor(&hook.url, last).await;
            last
        }
        Err(e) => return tracing::error!(url = %hook.url, "webhook cursor: {e}"),
    };
    loop {
        // Registered before reading, so an event appended meanwhile still wakes us.
        let appended = state.events_appended.notified();
        let filter = EventFilter { after: Some(cursor), limit: 100, ..Default::default() };
        let events = state.registry.events(&filter).await.unwrap_or_default();
        for event in &events {
            let wanted = hook.kinds.is_empty() || hook.kinds.contains(&event.kind);
            if wanted && !deliver(&client, &hook, event, &mut shutdown).await {
                return;
            }
            cursor = event.id;
            if let Err(e) = state.registry.set_webhook_cursor(&hook.url, cursor).await {
                tracing::error!(url = %hook.url, "webhook cursor: {e}");
            }
        }
        if events.len() == 100 {
            continue;
        }
        tokio::select! {
            _ = appended => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// POSTs one event until a 2xx answer or `max_attempts`. Returns false when shutting down.
async fn deliver(
    client: &reqwest::Client,
    hook: &Webhook,
    event: &Event,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let mut backoff = Duration::from_millis(hook.backoff_ms);
    for attempt in 1..=hook.max_attempts {
        let result = client
            .post(&hook.url)
            .header("x-algolink-event", event.kind.as_str())
            .header("x-algolink-delivery", format!("{}-{attempt}", event.id))
            .json(event)
            .send()
            .await;
        let why = match result {
            Ok(r) if r.status().is_success() => return true,
            Ok(r) => format!("answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        tracing::warn!(url = %hook.url, event = event.id, attempt, "webhook delivery failed: {why}");
        if attempt == hook.max_attempts {
            tracing::error!(url = %hook.url, event = event.id, "webhook gave up after {attempt} attempts");
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return false,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
    true
}
