# The orchestrate supervisor with Node 20 and the agent CLIs (see docker-compose.yml).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin orchestrate

FROM node:20-bookworm-slim
# Agent CLIs to install; set to "" for a supervisor that only runs `command` agents.
ARG AGENT_CLIS="@anthropic-ai/claude-code @openai/codex @google/gemini-cli"
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git \
    && rm -rf /var/lib/apt/lists/* \
    && if [ -n "$AGENT_CLIS" ]; then npm install -g $AGENT_CLIS && npm cache clean --force; fi
COPY --from=build /src/target/release/orchestrate /usr/local/bin/orchestrate
WORKDIR /project
ENTRYPOINT ["orchestrate"]
CMD ["start"]
