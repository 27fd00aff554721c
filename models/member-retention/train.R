# Fits member-retention's logistic regression with glm; called by models/train.py.
# Usage: Rscript train.R TRAIN_CSV PARAMS_JSON
suppressPackageStartupMessages(library(jsonlite))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1], na.strings = "", stringsAsFactors = FALSE)
d$tier <- factor(d$tier, levels = c("individual", "family", "patron"))
# A missing optional value becomes 0 plus an indicator, exactly as score.R scores it.
d$distance_missing <- as.numeric(is.na(d$distance_km))
d$distance_km <- ifelse(is.na(d$distance_km), 0, d$distance_km)
d$auto_renew <- as.numeric(tolower(d$auto_renew) %in% c("true", "t", "yes", "y", "1"))
fit <- glm(renewed ~ years_member + visits_last_year + tier + auto_renew + distance_km + distance_missing,
           data = d, family = binomial())
b <- signif(coef(fit), 12)
params <- list(
  model = "logistic regression, glm(family = binomial) in models/member-retention/train.R",
  intercept = unname(b[["(Intercept)"]]),
  years_member = unname(b[["years_member"]]),
  visits_last_year = unname(b[["visits_last_year"]]),
  tier = list(individual = 0, family = unname(b[["tierfamily"]]), patron = unname(b[["tierpatron"]])),
  auto_renew = unname(b[["auto_renew"]]),
  distance_km = unname(b[["distance_km"]]),
  distance_missing = unname(b[["distance_missing"]]),
  training_rows = nrow(d),
  aic = signif(fit$aic, 10)
)
write(toJSON(params, auto_unbox = TRUE, digits = NA, pretty = TRUE), args[2])
